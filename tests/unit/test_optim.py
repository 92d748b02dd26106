"""Unit tests for u2seg.model.optim: Detectron2-style param groups, lr_at, LambdaLR, per-param clipping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from u2seg.model.optim import (
    U2SEG_SOLVER,
    build_lr_scheduler,
    build_optimizer,
    clip_grad_norm_per_param_,
    lr_at,
    param_groups,
)

pytestmark = pytest.mark.unit

U2SEG = dict(warmup_steps=1000, warmup_factor=0.001, lr_steps=(210000, 250000), gamma=0.02)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        self.tied = self.fc  # the same parameters reachable twice


def test_param_groups_no_decay_on_norm_layers_biases_like_weights():
    net = Net()
    groups = param_groups(net, weight_decay=5e-5)
    by_wd = {g["weight_decay"]: {id(p) for p in g["params"]} for g in groups}
    assert set(by_wd) == {5e-5, 0.0}
    decayed = {id(p) for p in (net.conv.weight, net.conv.bias, net.fc.weight, net.fc.bias)}
    norms = {id(p) for p in (net.bn.weight, net.bn.bias, net.ln.weight, net.ln.bias)}
    assert by_wd[5e-5] == decayed and by_wd[0.0] == norms  # frozen left out, tied counted once
    assert sum(len(g["params"]) for g in groups) == 8


def test_param_groups_bias_and_name_overrides():
    net = Net()
    groups = param_groups(net, weight_decay=0.1, weight_decay_norm=None, weight_decay_bias=0.0,
                          overrides={"weight": {"lr": 0.5}})
    table = {id(p): (g["weight_decay"], g.get("lr")) for g in groups for p in g["params"]}
    assert table[id(net.conv.bias)] == (0.0, None)
    assert table[id(net.bn.weight)] == (0.1, 0.5)  # weight_decay_norm=None: norms like the rest
    with pytest.raises(ValueError, match="bias"):
        param_groups(net, weight_decay=0.1, weight_decay_bias=0.0, overrides={"bias": {"lr": 1.0}})


def test_build_optimizer_sgd_and_adamw():
    net = Net()
    sgd = build_optimizer(net, "sgd", 0.01, 5e-5)
    assert isinstance(sgd, torch.optim.SGD)
    assert {g["momentum"] for g in sgd.param_groups} == {0.9} and {g["lr"] for g in sgd.param_groups} == {0.01}
    assert {g["weight_decay"] for g in sgd.param_groups} == {5e-5, 0.0}
    adamw = build_optimizer(net.parameters(), "adamw", 1e-4, 0.05)
    assert isinstance(adamw, torch.optim.AdamW) and len(adamw.param_groups) == 1
    assert len(adamw.param_groups[0]["params"]) == 8  # frozen tensors filtered out
    with pytest.raises(ValueError, match="optimizer name"):
        build_optimizer(net, "adam", 0.01, 0.0)
    with pytest.raises(ValueError, match="lr"):
        build_optimizer(net, "sgd", 0.0, 0.0)


@pytest.mark.parametrize(
    ("step", "want"),
    [
        (0, 0.01 * 0.001),  # warmup starts at warmup_factor
        (500, 0.01 * (0.001 * 0.5 + 0.5)),  # linear halfway
        (999, 0.01 * (0.001 * (1 / 1000) + 999 / 1000)),
        (1000, 0.01),  # warmup_steps itself is past warmup
        (209999, 0.01),
        (210000, 0.01 * 0.02),  # decay applies at the step
        (249999, 0.01 * 0.02),
        (250000, 0.01 * 0.02**2),
        (269999, 0.01 * 0.02**2),
    ],
)
def test_lr_at_u2seg_schedule(step, want):
    assert lr_at(step, 0.01, **U2SEG) == pytest.approx(want, rel=1e-12)


def test_lr_at_decay_inside_warmup_and_no_warmup():
    # Detectron2's WarmupParamScheduler warms up towards the (already decayed) value at warmup end.
    kw = dict(warmup_steps=10, warmup_factor=0.5, lr_steps=(5,), gamma=0.1)
    assert lr_at(0, 1.0, **kw) == pytest.approx(0.5)
    assert lr_at(5, 1.0, **kw) == pytest.approx(0.5 * 0.5 + 0.1 * 0.5)
    assert lr_at(10, 1.0, **kw) == pytest.approx(0.1)
    assert lr_at(0, 2.0, warmup_steps=0, warmup_factor=0.001, lr_steps=(), gamma=0.1) == 2.0
    with pytest.raises(ValueError, match="ascending"):
        lr_at(0, 1.0, warmup_steps=0, warmup_factor=0.1, lr_steps=(5, 3), gamma=0.1)
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, 1.0, **kw)


def test_lambda_lr_follows_lr_at_and_resumes():
    kw = dict(warmup_steps=4, warmup_factor=0.1, lr_steps=(6, 8), gamma=0.5)
    net = Net()
    opt = build_optimizer(net, "sgd", 0.2, 1e-4)
    sched = build_lr_scheduler(opt, **kw)
    seen = []
    for _ in range(10):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for step, lrs in enumerate(seen):
        assert lrs == pytest.approx([lr_at(step, 0.2, **kw)] * len(lrs), rel=1e-12)
    state = opt.state_dict()
    opt2 = build_optimizer(Net(), "sgd", 0.2, 1e-4)
    opt2.load_state_dict(state)
    build_lr_scheduler(opt2, start_step=7, **kw)
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr_at(7, 0.2, **kw))
    with pytest.raises(ValueError, match="initial_lr"):
        build_lr_scheduler(build_optimizer(Net(), "sgd", 0.2, 0.0), start_step=3, **kw)


def test_u2seg_solver_constants():
    assert U2SEG_SOLVER["lr"] == 0.01 and U2SEG_SOLVER["weight_decay"] == 5e-5
    assert U2SEG_SOLVER["lr_steps"] == (210000, 250000) and U2SEG_SOLVER["gamma"] == 0.02


def test_clip_grad_norm_per_param_clips_each_tensor_alone():
    a = nn.Parameter(torch.zeros(2))
    b = nn.Parameter(torch.zeros(2))
    c = nn.Parameter(torch.zeros(1))  # no gradient
    a.grad = torch.tensor([3.0, 4.0])  # norm 5 -> 1
    b.grad = torch.tensor([0.3, 0.4])  # norm 0.5, untouched (a global clip would shrink it too)
    clip_grad_norm_per_param_([a, b, c], 1.0)
    assert a.grad.tolist() == pytest.approx([0.6, 0.8], rel=1e-5)
    assert b.grad.tolist() == pytest.approx([0.3, 0.4])
    assert c.grad is None
