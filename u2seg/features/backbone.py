"""timm ViT backbone for MaskCut: build it, preprocess images, and extract keys/tokens/CLS in one pass.

MaskCut's patch descriptor is the *key* of the last attention block (CutLER uses keys because they
separate objects better than output tokens); the final normed tokens and CLS feed the mask descriptors
and stuff clustering. Both come from a single forward: a hook on the last block's `attn.qkv` grabs the
keys while the model runs with fused (SDPA) attention.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import nn

from u2seg.features.weights import WeightsError, load_into, read_state_dict

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Features:
    """Per-patch features of a batch; N = h*w patches in row-major order."""

    keys: torch.Tensor  # [B, N, C] last block's attention keys, heads concatenated
    tokens: torch.Tensor  # [B, N, D] final normed patch tokens
    cls: torch.Tensor  # [B, D] final normed CLS token
    grid: tuple[int, int]  # (h, w) patch grid


def set_fused_attention(model: nn.Module, enabled: bool = True) -> int:
    """Switch every timm attention module to (or away from) F.scaled_dot_product_attention.

    Returns how many modules were switched, so callers/tests can check the model has attention at all.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = enabled
            n += 1
    return n


def build_backbone(
    name: str = "vit_base_patch8_224.dino",
    weights: str = "none",
    *,
    image_size: int = 480,
    seed: int = 0,
    storage_options: dict | None = None,
) -> nn.Module:
    """Build a timm ViT in eval mode with fused attention and a pos-embed grid for `image_size`.

    weights: "none" (random init from `seed`, for tests), "timm" (timm's pretrained tag; needs the hub),
    or a local path / fsspec URI to a .safetensors or torch checkpoint.
    """
    import timm

    kwargs = {"img_size": image_size, "dynamic_img_size": True, "num_classes": 0}
    if weights == "timm":
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as exc:
            raise WeightsError(
                f"could not fetch timm pretrained weights for {name!r} ({type(exc).__name__}: {exc}); "
                "the model hub must be reachable, or pass a local/s3 weights file instead"
            ) from exc
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(name, pretrained=False, **kwargs)
        if weights != "none":
            load_into(model, read_state_dict(weights, storage_options), name=weights)
    _check_vit(model, name, image_size)
    set_fused_attention(model, True)
    return model.eval().requires_grad_(False)


def _check_vit(model: nn.Module, name: str, image_size: int) -> None:
    blocks = getattr(model, "blocks", None)
    if not blocks or not hasattr(blocks[-1], "attn") or not hasattr(blocks[-1].attn, "qkv"):
        raise ValueError(f"{name!r} is not a timm ViT with blocks[-1].attn.qkv")
    ph, pw = patch_size(model)
    if image_size % ph or image_size % pw:
        raise ValueError(f"image_size {image_size} must be a multiple of the patch size {(ph, pw)}")


def patch_size(model: nn.Module) -> tuple[int, int]:
    ps = model.patch_embed.patch_size
    return (ps, ps) if isinstance(ps, int) else (int(ps[0]), int(ps[1]))


def preprocess(images: Sequence[np.ndarray], image_size: int) -> torch.Tensor:
    """Resize uint8 HxWx3 RGB images to a square `image_size` and ImageNet-normalise -> [B,3,S,S] f32.

    INTER_AREA when shrinking (anti-aliased), INTER_LINEAR when enlarging.
    """
    if not images:
        return torch.empty(0, 3, image_size, image_size)
    out = np.empty((len(images), image_size, image_size, 3), dtype=np.float32)
    for i, img in enumerate(images):
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"expected uint8 HxWx3 image, got {img.dtype} {img.shape}")
        h, w = img.shape[:2]
        interp = cv2.INTER_AREA if h * w >= image_size * image_size else cv2.INTER_LINEAR
        out[i] = cv2.resize(img, (image_size, image_size), interpolation=interp)
    out *= 1.0 / 255.0
    out -= np.asarray(IMAGENET_MEAN, dtype=np.float32)
    out /= np.asarray(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _autocast(device: torch.device, amp: str):
    if amp not in ("bf16", "fp16", "none"):
        raise ValueError(f"amp must be 'bf16', 'fp16' or 'none', got {amp!r}")
    if device.type != "cuda" or amp == "none":
        return nullcontext()  # CPU runs fp32: CPU autocast is slow and changes results for no gain
    return torch.autocast("cuda", dtype=_AMP_DTYPES[amp])


@torch.inference_mode()
def extract_features(model: nn.Module, images: torch.Tensor, amp: str = "bf16") -> Features:
    """One forward pass -> keys (hooked from the last block's qkv), final tokens and CLS, all float32."""
    device = next(model.parameters()).device
    images = images.to(device, non_blocking=True)
    ph, pw = patch_size(model)
    B, _, H, W = images.shape
    if H % ph or W % pw:
        raise ValueError(f"image size {(H, W)} is not a multiple of the patch size {(ph, pw)}")
    grid = (H // ph, W // pw)
    attn = model.blocks[-1].attn
    captured: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        captured["qkv"] = output

    handle = attn.qkv.register_forward_hook(hook)
    try:
        with _autocast(device, amp):
            out = model.forward_features(images)
    finally:
        handle.remove()
    n_prefix = int(getattr(model, "num_prefix_tokens", 1))
    qkv = captured["qkv"]
    T = qkv.shape[1]
    # qkv layout is [B, T, 3, heads, head_dim]; heads concatenated = the middle third, reshaped.
    keys = qkv.reshape(B, T, 3, -1)[:, n_prefix:, 1].float()
    tokens = out[:, n_prefix:].float()
    cls = out[:, 0].float() if n_prefix > 0 else tokens.mean(1)
    if tokens.shape[1] != grid[0] * grid[1]:
        raise RuntimeError(f"token count {tokens.shape[1]} != grid {grid}")
    return Features(keys=keys.contiguous(), tokens=tokens.contiguous(), cls=cls.contiguous(), grid=grid)
