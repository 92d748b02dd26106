"""Panoptic FPN's semantic head: every pyramid level is brought to stride 4 and summed, then classified.

Channel 0 means "a thing is here", channel 1 + s is stuff class s, and 255 marks void pixels that
the cross-entropy ignores (unlabelled pixels, crowd regions, batch padding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

VOID = 255
THING_CHANNEL = 0


def _gn_groups(channels: int) -> int:
    for g in (32, 16, 8, 4, 2):
        if channels % g == 0:
            return g
    return 1


class SemanticFPNHead(nn.Module):
    """Per level: log2(stride/4) x (3x3 conv, GroupNorm, ReLU, 2x upsample) (one conv for stride 4);
    sum; 1x1 conv to classes. Logits come out at stride 4."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        conv_dims: int = 128,
        strides: Sequence[int] = (4, 8, 16, 32),
        keys: Sequence[str] = ("0", "1", "2", "3"),
    ) -> None:
        super().__init__()
        self.keys = list(keys)
        self.common_stride = min(strides)
        self.scale_heads = nn.ModuleList()
        for stride in strides:
            n_up = int(math.log2(stride / self.common_stride))
            layers: list[nn.Module] = []
            for k in range(max(1, n_up)):
                layers += [
                    nn.Conv2d(in_channels if k == 0 else conv_dims, conv_dims, 3, padding=1, bias=False),
                    nn.GroupNorm(_gn_groups(conv_dims), conv_dims),
                    nn.ReLU(inplace=True),
                ]
                if n_up:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.predictor = nn.Conv2d(conv_dims, num_classes, kernel_size=1)
        nn.init.normal_(self.predictor.weight, std=0.01)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        out = None
        for key, head in zip(self.keys, self.scale_heads, strict=True):
            y = head(features[key])
            if out is None:
                out = y
            else:
                if y.shape[-2:] != out.shape[-2:]:  # odd sizes: align to the stride-4 grid
                    y = F.interpolate(y, size=out.shape[-2:], mode="bilinear", align_corners=False)
                out = out + y
        return self.predictor(out)


def semantic_targets_batch(
    targets: Sequence[torch.Tensor], image_sizes: Sequence[tuple[int, int]], padded: tuple[int, int]
) -> torch.Tensor:
    """Resize each (H, W) semantic target to its network input size and pad with VOID to the batch."""
    out = torch.full((len(targets), *padded), VOID, dtype=torch.int64, device=targets[0].device)
    for i, (sem, (h, w)) in enumerate(zip(targets, image_sizes, strict=True)):
        if sem.shape[-2:] != (h, w):
            sem = F.interpolate(sem[None, None].float(), size=(h, w), mode="nearest")[0, 0]
        out[i, :h, :w] = sem.long()
    return out


def semantic_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at input resolution (logits upsampled from stride 4), void ignored.
    All-void batches give an exact zero (with a graph) instead of NaN."""
    logits = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
    valid = target != VOID
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=VOID)


def upsample_semantic_logits(
    logits: torch.Tensor, image_size: tuple[int, int], original_size: tuple[int, int], stride: int
) -> torch.Tensor:
    """One image's (C, h/4, w/4) padded logits -> (C, H, W) at the original image size."""
    full = F.interpolate(logits[None].float(), scale_factor=stride, mode="bilinear", align_corners=False)
    full = full[..., : image_size[0], : image_size[1]]
    return F.interpolate(full, size=original_size, mode="bilinear", align_corners=False)[0]
