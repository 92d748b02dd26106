"""Multi-scale backbones for the detector: a ViT with a ViTDet simple feature pyramid, or a CNN + FPN.

torchvision's detection heads need an OrderedDict of maps at strides 4/8/16/32/64 (keys "0".."3",
"pool") and an `out_channels` attribute; both backbones below provide exactly that.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict

import timm
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d, freeze_batch_norm_2d
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from u2seg.model.config import ModelConfig

log = logging.getLogger(__name__)

PYRAMID_STRIDES = (4, 8, 16, 32)


def is_vit_name(name: str) -> bool:
    """timm ViT family names (vit_*, deit_*): these go through the simple feature pyramid."""
    base = name.split(".")[0]
    return base.startswith(("vit_", "deit_", "deit3_"))


def _scale_block(dim: int, ratio: float) -> tuple[nn.Module, int]:
    """Resample the single-scale ViT map by `ratio` (output stride / patch stride), as ViTDet does."""
    if ratio == 1:
        return nn.Identity(), dim
    if ratio > 1:
        k = int(ratio)
        return nn.MaxPool2d(kernel_size=k, stride=k), dim
    steps = round(math.log2(1 / ratio))
    layers: list[nn.Module] = []
    channels = dim
    for i in range(steps):
        layers.append(nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2))
        channels //= 2
        if i < steps - 1:
            layers += [LayerNorm2d(channels), nn.GELU()]
    return nn.Sequential(*layers), channels


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's pyramid: deconvolve / pool the last ViT map to strides 4..32, then 1x1 + 3x3 convs."""

    def __init__(self, vit: nn.Module, out_channels: int) -> None:
        super().__init__()
        patch = int(vit.patch_embed.patch_size[0])
        if patch & (patch - 1) or patch > 32:
            raise ValueError(f"simple feature pyramid needs a power-of-two patch size <= 32, got {patch}")
        self.vit = vit
        self.out_channels = out_channels
        self.stages = nn.ModuleList()
        for stride in PYRAMID_STRIDES:
            resample, channels = _scale_block(vit.embed_dim, stride / patch)
            self.stages.append(
                nn.Sequential(
                    resample,
                    nn.Conv2d(channels, out_channels, kernel_size=1, bias=False),
                    LayerNorm2d(out_channels),
                    nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
                    LayerNorm2d(out_channels),
                )
            )

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feat = self.vit.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[-1]
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for i, stage in enumerate(self.stages):
            out[str(i)] = stage(feat)
        out["pool"] = F.max_pool2d(out[str(len(self.stages) - 1)], kernel_size=1, stride=2)
        return out


class CNNFeaturePyramid(nn.Module):
    """A timm CNN (features_only, strides 4..32) with torchvision's FPN; BatchNorm is frozen because
    detection batches are too small for batch statistics."""

    def __init__(self, body: nn.Module, out_channels: int) -> None:
        super().__init__()
        strides = list(body.feature_info.reduction())
        if strides != list(PYRAMID_STRIDES):
            raise ValueError(f"CNN backbone must give strides {PYRAMID_STRIDES}, got {strides}")
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            list(body.feature_info.channels()), out_channels, extra_blocks=LastLevelMaxPool()
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))


def _create_vit(cfg: ModelConfig, storage_options: dict | None) -> nn.Module:
    """A timm ViT that accepts any input size (dynamic pos-embed); weights come from the features
    module, which owns weight loading (timm / file / s3 / none) for the whole project."""
    vit = timm.create_model(
        cfg.backbone,
        pretrained=False,
        dynamic_img_size=True,
        img_size=cfg.image_size,
        drop_path_rate=cfg.drop_path_rate,
        num_classes=0,
    )
    if cfg.weights != "none":
        from u2seg.features.backbone import build_backbone

        loaded = build_backbone(
            cfg.backbone,
            cfg.weights,
            image_size=cfg.image_size,
            seed=cfg.seed,
            storage_options=storage_options or {},
        )
        missing, unexpected = vit.load_state_dict(loaded.state_dict(), strict=False)
        if missing:
            raise ValueError(f"backbone weights lack parameters: {missing[:5]}")
        if unexpected:
            log.info("ignoring %d backbone weights not used by the detector", len(unexpected))
    return vit


def _freeze_vit(vit: nn.Module, n_blocks: int) -> None:
    if n_blocks == 0:
        return
    n = len(vit.blocks) if n_blocks < 0 else min(n_blocks, len(vit.blocks))
    modules: list[nn.Module] = [vit.patch_embed, *list(vit.blocks[:n])]
    if n_blocks < 0:
        modules.append(vit.norm)
    for m in modules:
        m.requires_grad_(False)
    for name in ("cls_token", "reg_token", "pos_embed"):
        p = getattr(vit, name, None)
        if isinstance(p, nn.Parameter):
            p.requires_grad_(False)


def _freeze_cnn(body: nn.Module, n_stages: int) -> None:
    if n_stages == 0:
        return
    # FeatureListNet keeps the stem first, then one child per stage; stage i ends at feature tap i.
    names = [n for n, _ in body.named_children()]
    taps = [info["module"].split(".")[0] for info in body.feature_info.get_dicts()]
    last = len(names) if n_stages < 0 else names.index(taps[min(n_stages, len(taps)) - 1]) + 1
    for name in names[:last]:
        getattr(body, name).requires_grad_(False)


_D2_RESNET_MARKERS = ("stem.conv1.", "res2.", "res3.", "res4.", "res5.")


def load_cnn_weights(body: nn.Module, state: dict[str, torch.Tensor], name: str = "<weights>") -> None:
    """Load a torchvision-layout CNN state dict (e.g. DINO's dino_resnet50_pretrain.pth:
    conv1.weight, bn1.*, layer1.0.conv1.weight, ..., maybe under module. / backbone.) into a timm
    features_only body, whose ResNet keys are the same names (timm and torchvision share them; the
    classifier fc.* has no place in the body and is ignored).

    Every tensor of the body must come from the checkpoint (BatchNorm's num_batches_tracked
    excepted, it is unused once BN is frozen): a missing key or a shape mismatch raises ValueError,
    naming the keys, so a wrong layout never trains from a half-random backbone.
    """
    from u2seg.features.weights import strip_prefixes

    state = strip_prefixes(state)
    own = body.state_dict()
    sample = ", ".join(sorted(state)[:5])
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        hint = ""
        if any(k.startswith(_D2_RESNET_MARKERS) for k in state):
            hint = " (this is Detectron2's ResNet layout, stem.* / res2..res5; use the torchvision-style checkpoint)"
        raise ValueError(
            f"{name}: backbone weights lack {len(missing)} of {len(own)} tensors, e.g. {missing[:5]}; "
            f"checkpoint keys start: {sample}{hint}"
        )
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
           if k in state and state[k].shape != v.shape]
    if bad:
        raise ValueError(f"{name}: shape mismatch for {len(bad)} backbone tensors, e.g. {bad[:3]}")
    unexpected = sorted(k for k in state if k not in own)
    if unexpected:
        level = logging.INFO if all(k.startswith("fc.") for k in unexpected) else logging.WARNING
        log.log(level, "%s: ignoring %d tensors not in the backbone: %s", name, len(unexpected), unexpected[:5])
    body.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
    log.info("%s: loaded %d backbone tensors", name, sum(k in state for k in own))


def build_pyramid_backbone(cfg: ModelConfig, storage_options: dict | None = None) -> nn.Module:
    """The detector backbone named by cfg.backbone: ViT -> simple pyramid; anything else -> CNN + FPN.

    CNN weights: "none", "timm", or a local path / s3:// URI to a .pth (torch.load weights_only) or
    .safetensors file in torchvision's layout (load_cnn_weights)."""
    if is_vit_name(cfg.backbone):
        vit = _create_vit(cfg, storage_options)
        _freeze_vit(vit, cfg.freeze_backbone_blocks)
        return SimpleFeaturePyramid(vit, cfg.pyramid_channels)
    extra = {}
    if cfg.weights == "none" and cfg.backbone.split(".")[0].startswith("resnet"):
        # timm zero-initialises each residual block's last BN scale; frozen, that zero would switch every
        # residual branch of a from-scratch ResNet off for good (only the stem and shortcuts would train)
        extra["zero_init_last"] = False
    body = timm.create_model(
        cfg.backbone,
        pretrained=cfg.weights == "timm",
        features_only=True,
        out_indices=(1, 2, 3, 4),
        drop_path_rate=cfg.drop_path_rate,
        **extra,
    )
    if cfg.weights not in ("none", "timm"):
        from u2seg.features.weights import read_state_dict

        load_cnn_weights(body, read_state_dict(cfg.weights, storage_options), name=cfg.weights)
    body = freeze_batch_norm_2d(body)
    _freeze_cnn(body, cfg.freeze_backbone_blocks)
    return CNNFeaturePyramid(body, cfg.pyramid_channels)
