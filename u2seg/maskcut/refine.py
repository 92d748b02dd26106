"""Patch masks -> image masks: nearest upsampling and an edge-aware refinement.

The reference refines each mask with a dense CRF (pydensecrf: unmaintained, CPU only) and drops the
mask when CRF output and raw mask disagree (IoU < 0.5). We use a colour guided filter (He et al.,
"Guided Image Filtering", with the "fast" subsampled variant) built from separable box filters in
torch: same role (snap blocky patch boundaries to image edges), runs on GPU or CPU, no extra package.
The filtered mask is thresholded at 0.5, holes are filled (as the reference does after its CRF), the
same IoU < 0.5 drop applies, and overlaps are resolved with the earlier mask winning.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F

REFINE_IOU_DROP = 0.5
GUIDED_EPS = 1e-3
MAX_FILTER_SIDE = 512  # the guided filter's coefficients are computed at most at this resolution


def upsample_masks(masks: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour upsampling of boolean masks [..., h, w] -> [..., H, W] (as the reference)."""
    lead = masks.shape[:-2]
    m = masks.reshape(-1, 1, *masks.shape[-2:]).to(torch.uint8)
    if m.shape[0] == 0:
        return torch.zeros(*lead, *out_hw, dtype=torch.bool, device=masks.device)
    up = F.interpolate(m, size=tuple(out_hw), mode="nearest")
    return up.reshape(*lead, *out_hw).bool()


def _box(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mean over a (2r+1)^2 window clipped at the borders, x: [C, H, W].

    Separable running sums (cumsum): O(1) per pixel whatever r. Sides are <= MAX_FILTER_SIDE, so the
    float32 prefix sums stay exact to ~1e-5.
    """
    for dim in (2, 1):
        n = x.shape[dim]
        c = F.pad(torch.cumsum(x, dim), (1, 0) if dim == 2 else (0, 0, 1, 0))
        i = torch.arange(n, device=x.device)
        hi, lo = (i + r + 1).clamp(max=n), (i - r).clamp(min=0)
        count = (hi - lo).to(x.dtype).view((1, 1, n) if dim == 2 else (1, n, 1))
        x = (c.index_select(dim, hi) - c.index_select(dim, lo)) / count
    return x


def guided_filter(
    guide: torch.Tensor, src: torch.Tensor, radius: int, eps: float = GUIDED_EPS
) -> torch.Tensor:
    """Colour guided filter of src [n,H,W] with guide [3,H,W] in [0,1]; returns [n,H,W] float.

    Coefficients are computed on a grid subsampled to <= MAX_FILTER_SIDE and upsampled bilinearly
    (He & Sun's fast guided filter), which bounds the cost for large images.
    """
    H, W = guide.shape[-2:]
    s = max(1.0, max(H, W) / MAX_FILTER_SIDE)
    if s > 1.0:
        hw = (max(1, round(H / s)), max(1, round(W / s)))
        gi = F.interpolate(guide[None], size=hw, mode="bilinear", align_corners=False)[0]
        p = F.interpolate(src[None], size=hw, mode="bilinear", align_corners=False)[0]
    else:
        gi, p = guide, src
    r = max(1, round(radius / s))
    h, w = gi.shape[-2:]
    n = p.shape[0]
    mean_I = _box(gi, r)  # [3,h,w]
    mean_p = _box(p, r)  # [n,h,w]
    Ip = (gi[None] * p[:, None]).reshape(n * 3, h, w)
    cov_Ip = _box(Ip, r).reshape(n, 3, h, w) - mean_I[None] * mean_p[:, None]
    ii, jj = torch.triu_indices(3, 3)
    var = _box(gi[ii] * gi[jj], r) - mean_I[ii] * mean_I[jj]  # [6,h,w]: s00 s01 s02 s11 s12 s22
    s00, s01, s02, s11, s12, s22 = var + eps * torch.tensor(
        [1, 0, 0, 1, 0, 1], dtype=gi.dtype, device=gi.device
    ).view(6, 1, 1)
    # Closed-form inverse of the symmetric positive definite 3x3 (cofactors): elementwise, GPU-friendly.
    c00, c01, c02 = s11 * s22 - s12 * s12, s02 * s12 - s01 * s22, s01 * s12 - s02 * s11
    c11, c12, c22 = s00 * s22 - s02 * s02, s01 * s02 - s00 * s12, s00 * s11 - s01 * s01
    inv_det = 1.0 / (s00 * c00 + s01 * c01 + s02 * c02)
    inv = torch.stack([c00, c01, c02, c01, c11, c12, c02, c12, c22]).view(3, 3, h, w) * inv_det
    a = torch.einsum("ijhw,njhw->nihw", inv, cov_Ip)  # [n,3,h,w]
    b = mean_p - (a * mean_I[None]).sum(1)
    mean_a = _box(a.reshape(n * 3, h, w), r)
    mean_b = _box(b, r)
    if s > 1.0:
        mean_a = F.interpolate(mean_a[None], size=(H, W), mode="bilinear", align_corners=False)[0]
        mean_b = F.interpolate(mean_b[None], size=(H, W), mode="bilinear", align_corners=False)[0]
    return (mean_a.reshape(n, 3, H, W) * guide[None]).sum(1) + mean_b


def _fill_holes(masks: torch.Tensor) -> torch.Tensor:
    # scipy on CPU: exact and fast for a handful of masks; there is no torch op for it.
    arr = masks.cpu().numpy()
    out = np.stack([scipy.ndimage.binary_fill_holes(m) for m in arr]) if len(arr) else arr
    return torch.from_numpy(out).to(masks.device)


def remove_overlaps(masks: torch.Tensor) -> torch.Tensor:
    """Earlier masks win: pixel p stays in mask k only if no mask j < k has it. masks [n,H,W] bool."""
    if masks.shape[0] <= 1:
        return masks
    earlier = torch.cumsum(masks.to(torch.int32), dim=0) - masks.to(torch.int32)
    return masks & (earlier == 0)


def _as_guide(image: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    img = torch.as_tensor(image, device=device)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"image must be HxWx3, got {tuple(img.shape)}")
    return img.permute(2, 0, 1).float().div_(255.0)


def refine_masks(
    masks_full: torch.Tensor,
    image: np.ndarray | torch.Tensor,
    method: str = "guided",
    *,
    radius: int | None = None,
    eps: float = GUIDED_EPS,
) -> torch.Tensor:
    """Refine full-resolution masks [n,H,W] bool against the uint8 HxWx3 RGB image -> [n,H,W] bool.

    "guided": guided filter (radius defaults to ~one patch at 480 px: max(H,W)/60), threshold 0.5, fill
    holes; a mask whose refined and raw versions have IoU < 0.5 is emptied (the reference's CRF test).
    "none": masks unchanged. Both end with `remove_overlaps`; empty masks mean dropped.
    """
    if method not in ("guided", "none"):
        raise ValueError(f"refine method must be 'guided' or 'none', got {method!r}")
    masks_full = masks_full.bool()
    if method == "none" or masks_full.shape[0] == 0:
        return remove_overlaps(masks_full)
    n, H, W = masks_full.shape
    if tuple(image.shape[:2]) != (H, W):
        raise ValueError(f"image {tuple(image.shape[:2])} and masks {(H, W)} differ in size")
    guide = _as_guide(image, masks_full.device)
    if radius is None:
        radius = max(2, round(max(H, W) / 60))
    live = masks_full.flatten(1).any(1)
    q = guided_filter(guide, masks_full.float(), radius, eps)
    refined = _fill_holes(q >= 0.5) & live.view(n, 1, 1)
    inter = (refined & masks_full).flatten(1).sum(1).float()
    union = (refined | masks_full).flatten(1).sum(1).float()
    keep = inter >= REFINE_IOU_DROP * union.clamp_min(1)
    refined &= (keep & live).view(n, 1, 1)
    return remove_overlaps(refined)
