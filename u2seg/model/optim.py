"""Optimizer, learning-rate schedule and gradient clipping of the U2Seg training recipe, pure.

U2Seg's u2seg_R50_800.yaml trains with Detectron2's defaults for everything it does not set:
SGD, BASE_LR 0.01, MOMENTUM 0.9, NESTEROV off, WEIGHT_DECAY 5e-5, WEIGHT_DECAY_NORM 0.0 (no decay
on normalisation layers), biases like weights (BIAS_LR_FACTOR 1, WEIGHT_DECAY_BIAS None), schedule
WarmupMultiStepLR with WARMUP_FACTOR 1/1000 over WARMUP_ITERS 1000 (linear), STEPS (210000, 250000),
GAMMA 0.02, MAX_ITER 270000, and CLIP_GRADIENTS norm 1.0 applied to each parameter tensor on its own
(Detectron2's per_param_clipper), not to the global norm. The constants below carry those values.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# U2Seg u2seg_R50_800.yaml + Detectron2 defaults (see the module docstring).
U2SEG_SOLVER: dict[str, Any] = {
    "name": "sgd",
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 5e-5,
    "weight_decay_norm": 0.0,
    "warmup_steps": 1000,
    "warmup_factor": 1.0 / 1000,
    "lr_steps": (210000, 250000),
    "gamma": 0.02,
    "max_steps": 270000,
    "clip_norm_per_param": 1.0,
    "images_per_batch": 16,
}

OPTIMIZERS = ("sgd", "adamw")

# Detectron2's get_default_optimizer_params norm_module_types (timm's LayerNorm2d subclasses LayerNorm).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def param_groups(
    model: nn.Module,
    *,
    weight_decay: float,
    weight_decay_norm: float | None = 0.0,
    weight_decay_bias: float | None = None,
    overrides: Mapping[str, Mapping[str, float]] | None = None,
) -> list[dict[str, Any]]:
    """Detectron2's default parameter groups: trainable parameters, each once, weight decay
    `weight_decay` except parameters of normalisation modules (`weight_decay_norm`, None = same) and,
    when given, biases (`weight_decay_bias`); `overrides` maps a parameter's own name (e.g. "pos_embed")
    to hyperparameters that win over those. Groups with equal hyperparameters are merged, in first-seen
    order, so a plain model gives one or two groups."""
    overrides = dict(overrides or {})
    if weight_decay_bias is not None:
        if "bias" in overrides:
            raise ValueError("conflicting overrides for 'bias' (weight_decay_bias is set too)")
        overrides["bias"] = {"weight_decay": weight_decay_bias}
    groups: dict[tuple, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            hyper = {"weight_decay": float(weight_decay)}
            if weight_decay_norm is not None and isinstance(module, NORM_TYPES):
                hyper["weight_decay"] = float(weight_decay_norm)
            hyper.update({k: float(v) for k, v in overrides.get(name, {}).items()})
            groups.setdefault(tuple(sorted(hyper.items())), []).append(p)
    return [{"params": ps, **dict(key)} for key, ps in groups.items()]


def build_optimizer(
    params_or_model: nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    name: str,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    *,
    weight_decay_norm: float | None = 0.0,
    weight_decay_bias: float | None = None,
    overrides: Mapping[str, Mapping[str, float]] | None = None,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """SGD (U2Seg / Detectron2) or AdamW over a model's Detectron2-style parameter groups.

    With a model, norm layers get `weight_decay_norm` (Detectron2's SOLVER.WEIGHT_DECAY_NORM = 0.0)
    and frozen parameters are left out. With an iterable of tensors (or ready param-group dicts) the
    groups are used as given and only `weight_decay` applies. `momentum` / `nesterov` are SGD's;
    `betas` / `eps` AdamW's.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer name must be one of {OPTIMIZERS}, got {name!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if isinstance(params_or_model, nn.Module):
        params: list = param_groups(
            params_or_model,
            weight_decay=weight_decay,
            weight_decay_norm=weight_decay_norm,
            weight_decay_bias=weight_decay_bias,
            overrides=overrides,
        )
    else:
        params = [p for p in params_or_model if not isinstance(p, torch.Tensor) or p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters to optimise")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def _check_schedule(warmup_steps: int, warmup_factor: float, lr_steps: Sequence[int], gamma: float) -> None:
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if not 0 <= warmup_factor <= 1:
        raise ValueError(f"warmup_factor must be in [0, 1], got {warmup_factor}")
    if list(lr_steps) != sorted(lr_steps) or any(s < 0 for s in lr_steps):
        raise ValueError(f"lr_steps must be non-negative and ascending, got {list(lr_steps)}")
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")


def lr_multiplier(
    step: int, *, warmup_steps: int, warmup_factor: float, lr_steps: Sequence[int], gamma: float
) -> float:
    """The factor on the base learning rate at optimizer step `step` (0-based); see lr_at."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    _check_schedule(warmup_steps, warmup_factor, lr_steps, gamma)
    steps = list(lr_steps)

    def decay(s: int) -> float:
        return gamma ** bisect.bisect_right(steps, s)

    if step >= warmup_steps:
        return decay(step)
    alpha = step / warmup_steps
    return warmup_factor * decay(0) * (1 - alpha) + decay(warmup_steps) * alpha


def lr_at(
    step: int,
    base_lr: float,
    *,
    warmup_steps: int,
    warmup_factor: float,
    lr_steps: Sequence[int],
    gamma: float,
) -> float:
    """Learning rate used by optimizer step `step` (0-based), as Detectron2's WarmupParamScheduler
    around a MultiStepParamScheduler (its build_lr_scheduler for WarmupMultiStepLR):

    - decayed(s) = base_lr * gamma ** (number of lr_steps <= s): the decay applies *at* a step, so
      step == lr_steps[i] already runs at the lower rate.
    - for step < warmup_steps: linear from warmup_factor * decayed(0) at step 0 towards
      decayed(warmup_steps), reached at step == warmup_steps (warmup_steps itself is past warmup).
    - warmup_steps == 0 means no warmup.

    This equals the older WarmupMultiStepLR (warmup multiplier times the decay) unless a decay step
    falls inside the warmup. Detectron2 computes `where = step / max_iter` with a 1e-6 epsilon, so its
    boundaries move by floor(1e-6 * max_iter) steps; that is 0 for max_iter < 1e6.
    """
    if not base_lr > 0:
        raise ValueError(f"base_lr must be > 0, got {base_lr}")
    return base_lr * lr_multiplier(
        step, warmup_steps=warmup_steps, warmup_factor=warmup_factor, lr_steps=lr_steps, gamma=gamma
    )


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    warmup_factor: float,
    lr_steps: Sequence[int],
    gamma: float,
    start_step: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR that sets every group's lr to its initial lr * lr_multiplier(step); call .step() once
    after each optimizer step (as Detectron2's LRScheduler hook). On construction the groups already
    hold the step-`start_step` rate. To resume at step > 0, load the optimizer state first (it keeps
    each group's "initial_lr") and pass start_step = the next step to run."""
    _check_schedule(warmup_steps, warmup_factor, lr_steps, gamma)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if start_step > 0 and any("initial_lr" not in g for g in optimizer.param_groups):
        raise ValueError("resuming a schedule (start_step > 0) needs an optimizer state with 'initial_lr'")
    steps = tuple(int(s) for s in lr_steps)

    def factor(step: int) -> float:
        return lr_multiplier(step, warmup_steps=warmup_steps, warmup_factor=warmup_factor, lr_steps=steps, gamma=gamma)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start_step - 1)


def clip_grad_norm_per_param_(params: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> None:
    """Clip each parameter's gradient to norm <= max_norm on its own, as Detectron2's CLIP_GRADIENTS
    (CLIP_TYPE "norm") does through its per-parameter clipper (no host sync per tensor). With a
    GradScaler, unscale first (Detectron2 clips inside optimizer.step, after GradScaler unscales)."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    for p in params:
        if p.grad is not None:
            torch.nn.utils.clip_grad_norm_(p, max_norm, norm_type)
