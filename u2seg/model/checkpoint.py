"""Model checkpoints: config + weights (+ optional optimizer state) in one torch file.

The config travels with the weights so a later stage rebuilds the same network without knowing how
it was trained; the backbone is rebuilt with weights="none" because the checkpoint already holds
the trained backbone (no hub or s3 read for pretrained weights at load time).
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from u2seg.model.config import ModelConfig
from u2seg.model.network import U2SegModel, build_model

FORMAT_VERSION = 1


def model_to_bytes(
    model: U2SegModel, *, optimizer: torch.optim.Optimizer | None = None, extra: dict[str, Any] | None = None
) -> bytes:
    payload = {
        "format": FORMAT_VERSION,
        "config": model.cfg.to_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "extra": extra or {},
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def model_from_bytes(
    data: bytes,
    *,
    map_location: str | torch.device = "cpu",
    optimizer: torch.optim.Optimizer | None = None,
    model: U2SegModel | None = None,
) -> tuple[U2SegModel, dict[str, Any]]:
    """Rebuild (or load into `model`) from model_to_bytes output; returns (model, extra).

    To resume training pass both `model` and its `optimizer`; their states are restored in place."""
    if optimizer is not None and model is None:
        raise ValueError("restoring optimizer state needs the model it was built for")
    payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    if payload.get("format") != FORMAT_VERSION:
        raise ValueError(f"unsupported checkpoint format {payload.get('format')!r}")
    if model is None:
        cfg = dataclasses.replace(ModelConfig.from_dict(payload["config"]), weights="none")
        model = build_model(cfg)
    model.load_state_dict(payload["model"])
    model.to(map_location)
    if optimizer is not None:
        if payload["optimizer"] is None:
            raise ValueError("checkpoint holds no optimizer state")
        optimizer.load_state_dict(payload["optimizer"])
    return model, payload["extra"]


# The layers whose outputs are the classes (Detectron2's names in comments): the box classifier (cls_score,
# one per cascade stage), the mask predictor's last conv (mask_fcn_logits: predictor), the semantic head's
# last conv (predictor). A class-specific box regressor (bbox_pred with 4 x classes outputs) is one too.
CLASS_LAYERS = ("cls_score", "mask_predictor.mask_fcn_logits", "semantic_head.predictor")
CLASS_SPECIFIC_BOX_REGRESSOR = "bbox_pred"


def is_class_layer(name: str, *, shapes_differ: bool = False) -> bool:
    """Whether state-dict key ``name`` belongs to a layer that predicts the classes (re-initialised when the
    classes change); a box regressor is one only when its shape depends on the classes (``shapes_differ``)."""
    module = name.rsplit(".", 1)[0]
    if any(module == c or module.endswith("." + c) for c in CLASS_LAYERS):
        return True
    return shapes_differ and (module.endswith("." + CLASS_SPECIFIC_BOX_REGRESSOR) or
                              module == CLASS_SPECIFIC_BOX_REGRESSOR)


def transfer_weights(model: U2SegModel, state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Load ``state`` (another model's weights, trained for other classes) into ``model``, except its class
    layers, which keep ``model``'s own (fresh) initialisation: fine-tuning a self-trained model for new
    categories keeps what it learned (backbone, FPN, RPN, box and mask trunks, semantic trunk) and starts
    the class predictions anew. Any other key missing, extra or of another shape is an error: the
    checkpoint is not this architecture. Returns the keys copied and those re-initialised."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(f"the checkpoint is another architecture: {len(missing)} key(s) missing (e.g. "
                         f"{missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]})")
    copied, fresh, wrong = [], [], []
    for name, tensor in own.items():
        differ = tuple(state[name].shape) != tuple(tensor.shape)
        if is_class_layer(name, shapes_differ=differ):
            fresh.append(name)
        elif differ:
            wrong.append(f"{name} {tuple(state[name].shape)} != {tuple(tensor.shape)}")
        else:
            copied.append(name)
    if wrong:
        raise ValueError(f"the checkpoint is another architecture: {len(wrong)} layer(s) of another shape, "
                         f"e.g. {wrong[:3]}")
    with torch.no_grad():
        for name in copied:
            own[name].copy_(state[name].to(own[name].device, own[name].dtype))
    return {"copied": copied, "reinitialised": fresh}


def transfer_from_bytes(data: bytes, model: U2SegModel, *, map_location: str | torch.device = "cpu"
                        ) -> dict[str, list[str]]:
    """:func:`transfer_weights` from a ``model_to_bytes`` checkpoint (its optimizer state is not used)."""
    payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    if payload.get("format") != FORMAT_VERSION:
        raise ValueError(f"unsupported checkpoint format {payload.get('format')!r}")
    return transfer_weights(model, payload["model"])


def save_model(
    model: U2SegModel,
    uri: str,
    *,
    storage_options: dict | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint to a local path or fsspec URI; local writes are atomic (tmp + rename),
    remote ones are a single PUT, so readers never see half a file."""
    data = model_to_bytes(model, optimizer=optimizer, extra=extra)
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def load_model(
    uri: str,
    *,
    storage_options: dict | None = None,
    map_location: str | torch.device = "cpu",
    optimizer: torch.optim.Optimizer | None = None,
    model: U2SegModel | None = None,
) -> tuple[U2SegModel, dict[str, Any]]:
    """Read a checkpoint written by save_model; see model_from_bytes."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return model_from_bytes(fs.cat_file(path), map_location=map_location, optimizer=optimizer, model=model)
