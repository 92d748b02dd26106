"""One optimisation step and the mixed-precision policy; the Ray Train loop around it lives in pipeline/."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence

import torch

from u2seg.model.network import U2SegModel
from u2seg.model.optim import clip_grad_norm_per_param_

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TARGET_KEYS = ("boxes", "labels", "masks", "semantic")
CLIP_MODES = ("global", "per_param")


def autocast_context(
    device: torch.device | str, amp: str, *, allow_cpu: bool = False
) -> contextlib.AbstractContextManager:
    """torch.autocast on CUDA for amp "bf16"/"fp16"; a no-op elsewhere (CPU autocast is slower than
    fp32 on most CPUs, so it is only used when asked for, e.g. to exercise the path in tests).
    Losses and the semantic/box/mask heads' loss inputs are computed in fp32 regardless."""
    device = torch.device(device)
    if amp == "none" or (device.type != "cuda" and not (allow_cpu and device.type == "cpu")):
        return contextlib.nullcontext()
    if amp not in _AMP_DTYPES:
        raise ValueError(f"unknown amp mode {amp!r}")
    return torch.autocast(device_type=device.type, dtype=_AMP_DTYPES[amp])


def batch_to_device(
    batch: Sequence[dict[str, torch.Tensor]], device: torch.device
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Split sample dicts (u2seg.model.targets) into the model's image list and target dicts."""
    images = [s["image"].to(device, non_blocking=True) for s in batch]
    targets = [{k: s[k].to(device, non_blocking=True) for k in TARGET_KEYS} for s in batch]
    return images, targets


def train_step(
    model: U2SegModel,
    optimizer: torch.optim.Optimizer,
    batch: Sequence[dict[str, torch.Tensor]],
    scaler: torch.amp.GradScaler | None = None,
    *,
    max_grad_norm: float | None = None,
    clip: str = "global",
    amp_on_cpu: bool = False,
) -> dict[str, float]:
    """Forward, backward and one optimizer step on an (already augmented) batch of samples.

    Returns every weighted loss term plus "loss_total" as Python floats. A non-finite total raises
    FloatingPointError before the step so a diverged run stops instead of corrupting the weights.
    Pass a GradScaler when cfg.amp == "fp16" (bf16 needs none). With ``max_grad_norm`` the gradients
    are clipped (after unscaling) to that L2 norm: ``clip="global"`` over all parameters together,
    ``"per_param"`` each parameter tensor on its own (Detectron2's CLIP_GRADIENTS, U2Seg's recipe).
    """
    if clip not in CLIP_MODES:
        raise ValueError(f"clip must be one of {CLIP_MODES}, got {clip!r}")
    model.train()
    device = model.device
    images, targets = batch_to_device(batch, device)
    optimizer.zero_grad(set_to_none=True)
    with autocast_context(device, model.cfg.amp, allow_cpu=amp_on_cpu):
        losses = model(images, targets)
    total = sum(losses.values())
    if not math.isfinite(float(total.detach())):
        detail = {k: float(v.detach()) for k, v in losses.items()}
        raise FloatingPointError(f"non-finite training loss: {detail}")
    if scaler is not None:
        scaler.scale(total).backward()
        if max_grad_norm is not None:
            scaler.unscale_(optimizer)
            _clip(model.parameters(), max_grad_norm, clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        total.backward()
        if max_grad_norm is not None:
            _clip(model.parameters(), max_grad_norm, clip)
        optimizer.step()
    out = {k: float(v.detach()) for k, v in losses.items()}
    out["loss_total"] = float(total.detach())
    return out


def _clip(params: Iterable[torch.Tensor], max_norm: float, clip: str) -> None:
    if clip == "per_param":
        clip_grad_norm_per_param_(params, max_norm)
    else:
        torch.nn.utils.clip_grad_norm_(list(params), max_norm)
