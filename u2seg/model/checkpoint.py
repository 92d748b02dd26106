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
