"""Load backbone weights from a local path or an fsspec URI (s3://...) into a timm ViT.

Checkpoints come in many wrappings (DINO full checkpoints keep a `teacher` dict whose keys start with
`module.backbone.`; DDP adds `module.`; training code nests under `model` / `state_dict`). We unwrap and
strip those so a plain timm ViT accepts them, resample the absolute position embedding to the model's
grid, and fail loudly when nothing matches instead of silently running a random network.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping

import fsspec
import torch
from torch import nn

logger = logging.getLogger(__name__)

# Preference order when a checkpoint nests several state dicts (DINO keeps both teacher and student;
# the teacher is the one the paper evaluates).
_NESTED_KEYS = ("teacher", "model", "state_dict", "model_state", "module", "student")
_PREFIXES = ("module.", "backbone.", "teacher.", "student.", "model.", "encoder.")
_SAFETENSORS_SUFFIXES = (".safetensors", ".st")


class WeightsError(RuntimeError):
    """A weights file could not be read or does not fit the backbone."""


def read_state_dict(uri: str, storage_options: dict | None = None) -> dict[str, torch.Tensor]:
    """Read a .safetensors or torch checkpoint from a path/URI and return a flat tensor dict."""
    try:
        with fsspec.open(uri, "rb", **(storage_options or {})) as fh:
            data = fh.read()
    except FileNotFoundError as exc:
        raise WeightsError(f"weights file not found: {uri}") from exc
    except Exception as exc:  # fsspec backends raise many types (auth, network, bad URI)
        raise WeightsError(f"cannot open weights {uri}: {type(exc).__name__}: {exc}") from exc
    return parse_state_dict(data, name=uri)


def parse_state_dict(data: bytes, name: str = "<bytes>") -> dict[str, torch.Tensor]:
    """Decode checkpoint bytes: safetensors by suffix or header sniffing, else torch (weights_only)."""
    if name.lower().endswith(_SAFETENSORS_SUFFIXES) or _looks_like_safetensors(data):
        from safetensors.torch import load as st_load

        try:
            return dict(st_load(data))
        except Exception as exc:
            raise WeightsError(f"{name}: not a valid safetensors file ({exc})") from exc
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"{name}: not a readable torch checkpoint or safetensors file "
            f"({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc
    return unwrap_state_dict(obj, name=name)


def _looks_like_safetensors(data: bytes) -> bool:
    # safetensors = 8-byte little-endian header length, then a JSON header starting with '{'.
    if len(data) < 9:
        return False
    n = int.from_bytes(data[:8], "little")
    return 0 < n <= len(data) - 8 and data[8:9] == b"{"


def unwrap_state_dict(obj: object, name: str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """Find the tensor dict inside common checkpoint wrappers."""
    for _ in range(4):  # nesting is shallow in practice; bound it so a cycle cannot loop
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        nested = next((k for k in _NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors:
                return tensors
            break
        obj = obj[nested]
    raise WeightsError(f"{name}: no tensor state dict found in checkpoint")


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (module., backbone., teacher., ...) wherever they lead a key."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        k = key
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k = k[len(p):]
                    changed = True
        out[k] = value
    return out


def _resample_pos_embed(pos: torch.Tensor, model: nn.Module) -> torch.Tensor:
    from timm.layers import resample_abs_pos_embed

    target = model.pos_embed
    if pos.shape == target.shape:
        return pos
    n_prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    grid = model.patch_embed.grid_size
    logger.info("resampling pos_embed %s -> %s", tuple(pos.shape), tuple(target.shape))
    return resample_abs_pos_embed(pos, new_size=list(grid), num_prefix_tokens=n_prefix)


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], name: str = "<weights>") -> None:
    """Load a (cleaned) state dict into a timm ViT, reporting missing/unexpected keys.

    Raises WeightsError when no key matches or a matched tensor has the wrong shape.
    """
    state = strip_prefixes(unwrap_state_dict(dict(state), name=name))
    if "pos_embed" in state and hasattr(model, "pos_embed"):
        state["pos_embed"] = _resample_pos_embed(state["pos_embed"], model)
    own = model.state_dict()
    matched = [k for k in state if k in own]
    if not matched:
        sample = ", ".join(sorted(state)[:5])
        raise WeightsError(f"{name}: no key matches the backbone (checkpoint keys start: {sample})")
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
           for k in matched if state[k].shape != own[k].shape]
    if bad:
        raise WeightsError(f"{name}: shape mismatch for {len(bad)} keys, e.g. {bad[:3]}")
    result = model.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing:
        logger.warning("%s: %d backbone keys missing from weights (kept random init): %s",
                       name, len(missing), missing[:10])
    if unexpected:
        logger.warning("%s: %d unexpected keys ignored: %s", name, len(unexpected), unexpected[:10])
    logger.info("%s: loaded %d/%d backbone tensors", name, len(matched), len(own))
