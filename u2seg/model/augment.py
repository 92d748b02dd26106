"""Training augmentation on sample dicts (see u2seg.model.targets): scale, flip and copy-paste.

Every function is pure: it returns new samples and draws randomness only from the torch.Generator
it is given, so a seeded trainer is reproducible. Boxes are always recomputed from the masks, so
they cannot drift from them; instances left with no (or too little) visible area are removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from u2seg.model.semantic import THING_CHANNEL
from u2seg.model.targets import boxes_from_masks

Sample = dict[str, torch.Tensor]
SCALE_MODES = ("multiscale", "lsj", "none")


@dataclass
class AugmentConfig:
    """multiscale: shortest edge drawn from short_sizes, longest capped at max_size (as U2Seg's
    Detectron2 config); lsj: large-scale jitter, rescale by U(lsj_min_scale, lsj_max_scale) x lsj_size, then a
    random crop of at most lsj_size x lsj_size."""

    scale_mode: str = "multiscale"
    short_sizes: tuple[int, ...] = (240, 320, 480, 640, 672, 704, 736, 768, 800, 1024)  # U2Seg's recipe
    max_size: int = 1333
    lsj_size: int = 1024
    lsj_min_scale: float = 0.1
    lsj_max_scale: float = 2.0
    hflip_prob: float = 0.5
    copy_paste_prob: float = 1.0  # CutLER: every image, random number of objects, scale 0.3..1
    copy_paste_max_objects: int = 8
    copy_paste_scale: tuple[float, float] = (0.3, 1.0)
    min_visible_fraction: float = 0.1

    def __post_init__(self) -> None:
        self.short_sizes = tuple(int(s) for s in self.short_sizes)
        self.copy_paste_scale = (float(self.copy_paste_scale[0]), float(self.copy_paste_scale[1]))
        if self.scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {SCALE_MODES}")
        if not 0 < self.copy_paste_scale[0] <= self.copy_paste_scale[1] <= 1:
            raise ValueError("copy_paste_scale must satisfy 0 < lo <= hi <= 1")


def _uniform(generator: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def _randint(generator: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] inclusive."""
    return int(torch.randint(lo, hi + 1, (), generator=generator))


def _with_masks(sample: Sample, masks: torch.Tensor, keep: torch.Tensor | None = None) -> Sample:
    """New sample with these masks, boxes recomputed, and empty (or `keep`-false) instances removed."""
    valid = (
        masks.flatten(1).bool().any(dim=1)
        if masks.shape[0]
        else torch.zeros(0, dtype=torch.bool, device=masks.device)
    )
    if keep is not None:
        valid = valid & keep
    out = dict(sample)
    out["masks"] = masks[valid]
    out["labels"] = sample["labels"][valid]
    out["boxes"] = boxes_from_masks(out["masks"])
    return out


def resize_sample(sample: Sample, height: int, width: int) -> Sample:
    """Resize image (bilinear, antialiased), masks and semantic map (nearest) to (height, width)."""
    img = sample["image"]
    if tuple(img.shape[-2:]) == (height, width):
        return dict(sample)
    out = dict(sample)
    out["image"] = F.interpolate(
        img[None], size=(height, width), mode="bilinear", align_corners=False, antialias=True
    )[0].clamp_(0, 1)
    out["semantic"] = F.interpolate(
        sample["semantic"][None, None].float(), size=(height, width), mode="nearest"
    )[0, 0].long()
    masks = sample["masks"]
    if masks.shape[0]:
        masks = F.interpolate(masks[None].float(), size=(height, width), mode="nearest")[0].to(torch.uint8)
    else:
        masks = masks.new_zeros((0, height, width))
    return _with_masks(out, masks)


def resize_shortest_edge(sample: Sample, short: int, max_size: int) -> Sample:
    h, w = sample["image"].shape[-2:]
    scale = min(short / min(h, w), max_size / max(h, w))
    return resize_sample(sample, max(1, round(h * scale)), max(1, round(w * scale)))


def crop_sample(sample: Sample, top: int, left: int, height: int, width: int) -> Sample:
    out = dict(sample)
    out["image"] = sample["image"][:, top : top + height, left : left + width]
    out["semantic"] = sample["semantic"][top : top + height, left : left + width]
    return _with_masks(out, sample["masks"][:, top : top + height, left : left + width])


def hflip(sample: Sample) -> Sample:
    out = dict(sample)
    out["image"] = sample["image"].flip(-1)
    out["semantic"] = sample["semantic"].flip(-1)
    return _with_masks(out, sample["masks"].flip(-1))


def scale_jitter(
    sample: Sample, *, output_size: int, min_scale: float, max_scale: float, generator: torch.Generator
) -> Sample:
    """Large-scale jitter: fit the image into output_size * s (s ~ U(min, max)) keeping its aspect,
    then crop a random output_size window if larger. Smaller results are padded by the batcher."""
    h, w = sample["image"].shape[-2:]
    s = _uniform(generator, min_scale, max_scale)
    scale = output_size * s / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    out = resize_sample(sample, nh, nw)
    ch, cw = min(nh, output_size), min(nw, output_size)
    if (ch, cw) != (nh, nw):
        out = crop_sample(out, _randint(generator, 0, nh - ch), _randint(generator, 0, nw - cw), ch, cw)
    return out


def copy_paste(
    dst: Sample,
    src: Sample,
    *,
    generator: torch.Generator,
    max_objects: int = 8,
    scale_range: tuple[float, float] = (0.3, 1.0),
    min_visible_fraction: float = 0.1,
) -> Sample:
    """Paste a random subset of src's instances (pixels and masks) at a random place in dst.

    src is first rescaled to fit inside dst and shrunk by U(scale_range). Pasted pixels occlude dst:
    dst masks lose them and instances keeping less than min_visible_fraction of their area are
    removed; the semantic target there becomes "thing".
    """
    n_src = src["masks"].shape[0]
    if n_src == 0 or max_objects < 1:
        return dict(dst)
    k = _randint(generator, 1, min(n_src, max_objects))
    chosen = torch.randperm(n_src, generator=generator)[:k].sort().values
    hd, wd = dst["image"].shape[-2:]
    hs, ws = src["image"].shape[-2:]
    fit = min(hd / hs, wd / ws) * _uniform(generator, *scale_range)
    nh, nw = max(1, min(hd, int(hs * fit))), max(1, min(wd, int(ws * fit)))
    part = {k_: src[k_] for k_ in ("image", "semantic")}
    part["masks"] = src["masks"][chosen]
    part["labels"] = src["labels"][chosen]
    part = resize_sample(part, nh, nw)
    if part["masks"].shape[0] == 0:  # every chosen object vanished when shrunk
        return dict(dst)
    top, left = _randint(generator, 0, hd - nh), _randint(generator, 0, wd - nw)

    pasted = torch.zeros((part["masks"].shape[0], hd, wd), dtype=torch.uint8, device=dst["masks"].device)
    pasted[:, top : top + nh, left : left + nw] = part["masks"]
    union = pasted.bool().any(dim=0)

    out = dict(dst)
    image = dst["image"].clone()
    canvas = torch.zeros_like(image)
    canvas[:, top : top + nh, left : left + nw] = part["image"]
    image[:, union] = canvas[:, union]
    out["image"] = image
    semantic = dst["semantic"].clone()
    semantic[union] = THING_CHANNEL
    out["semantic"] = semantic

    old = dst["masks"]
    if old.shape[0]:
        before = old.flatten(1).sum(dim=1).float()
        old = old * (~union).to(old.dtype)
        after = old.flatten(1).sum(dim=1).float()
        keep = after >= min_visible_fraction * before
    else:
        keep = torch.zeros(0, dtype=torch.bool, device=old.device)
    out = _with_masks(out, old, keep)
    masks = torch.cat([out["masks"], pasted])
    labels = torch.cat([out["labels"], part["labels"]])
    out["labels"] = labels
    return _with_masks(out, masks)


def copy_paste_batch(
    samples: Sequence[Sample],
    *,
    generator: torch.Generator,
    prob: float,
    max_objects: int = 8,
    scale_range: tuple[float, float] = (0.3, 1.0),
    min_visible_fraction: float = 0.1,
) -> list[Sample]:
    """With probability prob per image, paste objects from another image of the batch (itself when the
    batch has one image). Sources are the un-pasted originals, so the result is order-independent."""
    n = len(samples)
    out = []
    for i, s in enumerate(samples):
        if n == 0 or float(torch.rand((), generator=generator)) >= prob:
            out.append(dict(s))
            continue
        j = i if n == 1 else (i + _randint(generator, 1, n - 1)) % n
        out.append(
            copy_paste(
                s,
                samples[j],
                generator=generator,
                max_objects=max_objects,
                scale_range=scale_range,
                min_visible_fraction=min_visible_fraction,
            )
        )
    return out


def augment_batch(samples: Sequence[Sample], cfg: AugmentConfig, generator: torch.Generator) -> list[Sample]:
    """The training recipe: per-image scale (multiscale / LSJ / none) and flip, then batch copy-paste."""
    out = []
    for s in samples:
        if cfg.scale_mode == "multiscale":
            short = cfg.short_sizes[_randint(generator, 0, len(cfg.short_sizes) - 1)]
            s = resize_shortest_edge(s, short, cfg.max_size)
        elif cfg.scale_mode == "lsj":
            s = scale_jitter(
                s,
                output_size=cfg.lsj_size,
                min_scale=cfg.lsj_min_scale,
                max_scale=cfg.lsj_max_scale,
                generator=generator,
            )
        if float(torch.rand((), generator=generator)) < cfg.hflip_prob:
            s = hflip(s)
        out.append(s)
    return copy_paste_batch(
        out,
        generator=generator,
        prob=cfg.copy_paste_prob,
        max_objects=cfg.copy_paste_max_objects,
        scale_range=cfg.copy_paste_scale,
        min_visible_fraction=cfg.min_visible_fraction,
    )


__all__ = [
    "AugmentConfig",
    "augment_batch",
    "copy_paste",
    "copy_paste_batch",
    "crop_sample",
    "hflip",
    "resize_sample",
    "resize_shortest_edge",
    "scale_jitter",
]
