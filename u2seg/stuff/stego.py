"""STEGO's segmentation head, contrastive correlation loss, cluster probe and training step, as pure torch.

STEGO (Hamilton et al., ICLR 2022) distils frozen self-supervised backbone features into a low-dimensional
"code" whose correlations mimic the features' correlations, then clusters the code with a cosine
cluster probe. U2Seg takes its stuff classes from that probe. Everything here works on features the
caller already extracted ([B, C, h, w], e.g. DINO's final normed patch tokens laid out on the patch grid),
so there is no backbone, no Lightning, no Ray and no IO.

Correspondence to STEGO's code (src/modules.py, src/train_segmentation.py):
- `StegoHead.cluster1` / `.cluster2` are DinoFeaturizer's linear and nonlinear 1x1-conv projections; in
  training each branch sees its own Dropout2d draw of the features, as in DinoFeaturizer.forward.
- `StegoHead.cluster_probe.clusters` is ClusterLookup's centre matrix; `probe_loss` is ClusterLookup
  with alpha=None (hard one-hot assignment), `assign` its argmax.
- `correlation_term` is ContrastiveCorrelationLoss.helper, `contrastive_correlation_loss` its forward
  (salience sampling is not supported: STEGO's cocostuff27 config has use_salience False).
- `stego_train_step` is LitUnsupervisedSegmenter.training_step without the linear probe (it needs labels)
  and without the reconstruction / augmentation-alignment / CRF terms (all weighted 0 in STEGO's configs).

Random draws (dropout masks, sampling coordinates, negative permutations) all come from an optional
torch.Generator so a step is reproducible; the generator must live on the tensors' device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# STEGO's `norm` uses eps=1e-10 (F.normalize's default is 1e-12); kept so the loss matches bit for bit.
_NORM_EPS = 1e-10

# Keys of STEGO's LitUnsupervisedSegmenter state dict that this head reads (the rest is ignored).
STEGO_KEYS_LINEAR = ("net.cluster1.0.weight", "net.cluster1.0.bias")
STEGO_KEYS_NONLINEAR = ("net.cluster2.0.weight", "net.cluster2.0.bias", "net.cluster2.2.weight", "net.cluster2.2.bias")
STEGO_KEY_PROBE = "cluster_probe.clusters"


# --------------------------------------------------------------------------------------------------
# Head and cluster probe
# --------------------------------------------------------------------------------------------------


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator lives on {generator.device} but the tensors on {device}; make it there")


def _dropout2d(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """nn.Dropout2d's training behaviour (whole channels per sample, survivors scaled by 1/(1-p)), seedable."""
    if p <= 0.0:
        return x
    _check_generator(generator, x.device)
    keep = torch.empty(x.shape[0], x.shape[1], 1, 1, dtype=x.dtype, device=x.device)
    keep.bernoulli_(1.0 - p, generator=generator)
    return x * keep.div_(1.0 - p)


class ClusterProbe(nn.Module):
    """STEGO's ClusterLookup: `n_clusters` free centres, scored against the code by cosine similarity."""

    def __init__(self, dim: int, n_clusters: int) -> None:
        super().__init__()
        self.clusters = nn.Parameter(torch.randn(n_clusters, dim))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            self.clusters.copy_(torch.randn(self.clusters.shape, generator=generator))

    def inner_products(self, code: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of every code vector with every centre: [B, K, h, w]."""
        normed_clusters = F.normalize(self.clusters, dim=1)
        normed_code = F.normalize(code, dim=1)
        return torch.einsum("bchw,nc->bnhw", normed_code, normed_clusters)

    def forward(self, code: torch.Tensor, alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, probs) as ClusterLookup.forward: hard one-hot probs when alpha is None, else softmax(alpha*cos).

        The loss is minus the mean probability-weighted cosine; with alpha None it pulls each centre
        towards the codes currently assigned to it (a spherical k-means step by gradient descent).
        """
        inner = self.inner_products(code)
        if alpha is None:
            probs = F.one_hot(inner.argmax(dim=1), inner.shape[1]).permute(0, 3, 1, 2).to(inner.dtype)
        else:
            probs = torch.softmax(inner * alpha, dim=1)
        return -(probs * inner).sum(1).mean(), probs


class StegoHead(nn.Module):
    """Frozen-feature projection (features -> code) plus the cosine cluster probe (code -> class).

    `cluster1` is a 1x1 conv C->D, `cluster2` (nonlinear=True, STEGO's projection_type "nonlinear")
    is 1x1 conv C->C, ReLU, 1x1 conv C->D; the code is their sum. In training mode each branch gets
    its own Dropout2d(p) draw of the input, exactly like STEGO's DinoFeaturizer; in eval mode the code
    is cluster1(x) + cluster2(x).
    """

    def __init__(
        self,
        in_dim: int,
        code_dim: int = 70,
        n_clusters: int = 27,
        *,
        dropout: float = 0.1,
        nonlinear: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("code_dim", code_dim), ("n_clusters", n_clusters)):
            if int(value) != value or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.in_dim, self.code_dim, self.n_clusters = int(in_dim), int(code_dim), int(n_clusters)
        self.dropout_p = float(dropout)
        self.nonlinear = bool(nonlinear)
        self.cluster1 = nn.Sequential(nn.Conv2d(self.in_dim, self.code_dim, (1, 1)))
        self.cluster2: nn.Sequential | None = None
        if self.nonlinear:
            self.cluster2 = nn.Sequential(
                nn.Conv2d(self.in_dim, self.in_dim, (1, 1)), nn.ReLU(), nn.Conv2d(self.in_dim, self.code_dim, (1, 1))
            )
        self.cluster_probe = ClusterProbe(self.code_dim, self.n_clusters)
        if generator is not None:
            self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-draw all weights with torch's Conv2d defaults and randn centres (as STEGO), from `generator`."""
        convs = [m for m in self.modules() if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            for conv in convs:
                nn.init.kaiming_uniform_(conv.weight, a=math.sqrt(5), generator=generator)
                fan_in = conv.weight.shape[1] * conv.weight.shape[2] * conv.weight.shape[3]
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(conv.bias, -bound, bound, generator=generator)
        self.cluster_probe.reset_parameters(generator)

    def projection_parameters(self) -> list[nn.Parameter]:
        """What STEGO's net optimiser trains (cluster1 + cluster2), without the probe."""
        params = list(self.cluster1.parameters())
        if self.cluster2 is not None:
            params += list(self.cluster2.parameters())
        return params

    def _check_feats(self, feats: torch.Tensor) -> None:
        if feats.ndim != 4 or feats.shape[1] != self.in_dim:
            raise ValueError(f"feats must be [B, {self.in_dim}, h, w], got shape {tuple(feats.shape)}")

    def _check_code(self, code: torch.Tensor) -> None:
        if code.ndim != 4 or code.shape[1] != self.code_dim:
            raise ValueError(f"code must be [B, {self.code_dim}, h, w], got shape {tuple(code.shape)}")

    def forward(self, feats: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Code [B, D, h, w]; dropout (one draw per branch) only in training mode."""
        self._check_feats(feats)
        drop = self.training and self.dropout_p > 0.0
        x1 = _dropout2d(feats, self.dropout_p, generator) if drop else feats
        code = self.cluster1(x1)
        if self.cluster2 is not None:
            x2 = _dropout2d(feats, self.dropout_p, generator) if drop else feats
            code = code + self.cluster2(x2)
        return code

    def dropout_features(self, feats: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The features STEGO hands to its loss when cfg.dropout is on: one more Dropout2d draw (train mode)."""
        self._check_feats(feats)
        if not self.training:
            return feats
        return _dropout2d(feats, self.dropout_p, generator)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """Code without dropout, whatever the module's mode (inference)."""
        self._check_feats(feats)
        code = self.cluster1(feats)
        if self.cluster2 is not None:
            code = code + self.cluster2(feats)
        return code

    def probe_loss(self, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ClusterLookup(code, alpha=None): (loss, one-hot probs [B, K, h, w])."""
        self._check_code(code)
        return self.cluster_probe(code, None)

    def cluster_log_probs(self, code: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
        """log_softmax(alpha * cosine) over centres, [B, K, h, w]: what STEGO feeds its CRF (alpha=2)."""
        self._check_code(code)
        return torch.log_softmax(self.cluster_probe.inner_products(code) * alpha, dim=1)

    def assign(self, code: torch.Tensor) -> torch.Tensor:
        """Nearest centre by cosine for every code vector: int64 [B, h, w]."""
        self._check_code(code)
        return self.cluster_probe.inner_products(code).argmax(dim=1)

    @torch.no_grad()
    def predict(self, feats: torch.Tensor, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Features -> class map, int64 [B, H, W]; STEGO's eval upsamples the code bilinearly before the probe."""
        code = self.project(feats)
        if out_size is not None:
            code = F.interpolate(code, size=tuple(out_size), mode="bilinear", align_corners=False)
        return self.assign(code)


# --------------------------------------------------------------------------------------------------
# Checkpoints in STEGO's key format
# --------------------------------------------------------------------------------------------------


def _tensor(state: Mapping, key: str) -> torch.Tensor:
    value = state[key]
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"STEGO state dict entry {key!r} is a {type(value).__name__}, not a tensor")
    return value.detach().to("cpu", torch.float32)


def _expect(key: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"STEGO state dict entry {key!r} has shape {tuple(tensor.shape)}, expected {shape}")


def load_stego_head(state_dict_or_checkpoint: Mapping, *, dropout: float = 0.1) -> StegoHead:
    """Build a StegoHead from a STEGO Lightning checkpoint ({"state_dict": ...}) or a bare state dict.

    Reads `net.cluster1.0.*`, `net.cluster2.{0,2}.*` (absent = STEGO's linear projection) and
    `cluster_probe.clusters`; C, D and K come from their shapes. Every other key (backbone `net.model.*`,
    `linear_probe.*`, `train_cluster_probe.*`, `decoder.*`, ...) is ignored. Missing or inconsistent
    entries raise ValueError naming the key.
    """
    if not isinstance(state_dict_or_checkpoint, Mapping):
        raise ValueError(f"expected a STEGO checkpoint or state dict (a mapping), got {type(state_dict_or_checkpoint)}")
    state = state_dict_or_checkpoint
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    required = (*STEGO_KEYS_LINEAR, STEGO_KEY_PROBE)
    missing = [k for k in required if k not in state]
    if missing:
        sample = sorted(str(k) for k in state)[:8]
        hint = ""
        if any(str(k).startswith("module.") for k in state):
            hint = " (keys carry a 'module.' prefix: strip it first)"
        raise ValueError(f"not a STEGO head state dict: missing {missing}{hint}; first keys present: {sample}")
    present_nl = [k for k in STEGO_KEYS_NONLINEAR if k in state]
    if present_nl and len(present_nl) != len(STEGO_KEYS_NONLINEAR):
        absent = [k for k in STEGO_KEYS_NONLINEAR if k not in state]
        raise ValueError(f"STEGO nonlinear projection is incomplete: missing {absent}")

    w1 = _tensor(state, "net.cluster1.0.weight")
    if w1.ndim != 4 or w1.shape[2:] != (1, 1):
        raise ValueError(f"STEGO state dict entry 'net.cluster1.0.weight' must be [D, C, 1, 1], got {tuple(w1.shape)}")
    code_dim, in_dim = int(w1.shape[0]), int(w1.shape[1])
    clusters = _tensor(state, STEGO_KEY_PROBE)
    if clusters.ndim != 2:
        raise ValueError(f"STEGO state dict entry {STEGO_KEY_PROBE!r} must be [K, D], got {tuple(clusters.shape)}")
    n_clusters = int(clusters.shape[0])
    _expect(STEGO_KEY_PROBE, clusters, (n_clusters, code_dim))
    b1 = _tensor(state, "net.cluster1.0.bias")
    _expect("net.cluster1.0.bias", b1, (code_dim,))

    head = StegoHead(in_dim, code_dim, n_clusters, dropout=dropout, nonlinear=bool(present_nl))
    ours: dict[str, torch.Tensor] = {"cluster1.0.weight": w1, "cluster1.0.bias": b1, "cluster_probe.clusters": clusters}
    if present_nl:
        expected = {
            "net.cluster2.0.weight": (in_dim, in_dim, 1, 1),
            "net.cluster2.0.bias": (in_dim,),
            "net.cluster2.2.weight": (code_dim, in_dim, 1, 1),
            "net.cluster2.2.bias": (code_dim,),
        }
        for key, shape in expected.items():
            t = _tensor(state, key)
            _expect(key, t, shape)
            ours[key.removeprefix("net.")] = t
    head.load_state_dict(ours, strict=True)
    log.info("loaded STEGO head: C=%d D=%d K=%d nonlinear=%s", in_dim, code_dim, n_clusters, bool(present_nl))
    return head


def stego_state_dict(head: StegoHead) -> dict[str, torch.Tensor]:
    """The head's weights under STEGO's key names (CPU copies), so `load_stego_head` reads them back."""
    out: dict[str, torch.Tensor] = {}
    for key, value in head.state_dict().items():
        name = key if key.startswith("cluster_probe.") else f"net.{key}"
        out[name] = value.detach().to("cpu").clone()
    return out


# --------------------------------------------------------------------------------------------------
# Training configuration
# --------------------------------------------------------------------------------------------------

# Loss shifts/weights STEGO published, by the label they carry in STEGO's src/configs/train_config.yml.
# "cocostuff27_vit_base" ("Cocostuff27 10/3 vit_base") is what the released cocostuff27_vit_base_5.ckpt
# (the checkpoint U2Seg's stuff labels come from) was trained with: merantix-momentum/stego-studies' README
# retrains it with exactly these values, plus model_type vit_base, max_steps 7000, batch_size 32, five crops,
# "as found in the configuration of the pre-trained STEGO models". The yml's *active* block is labelled
# "IAROA vit small 1/31/22", i.e. not a cocostuff27 setting, so it is kept only as "train_config_active".
STEGO_LOSS_PRESETS: dict[str, dict[str, float]] = {
    "cocostuff27_vit_base": dict(
        neg_inter_weight=0.1538476246415498, pos_inter_weight=1.0, pos_intra_weight=0.1,
        neg_inter_shift=1.0, pos_inter_shift=0.2, pos_intra_shift=0.12,
    ),
    "cocostuff27_vit_small": dict(  # "Cocostuff27 vit small 1/31/22" (commented block)
        neg_inter_weight=0.63, pos_inter_weight=0.25, pos_intra_weight=0.67,
        neg_inter_shift=0.66, pos_inter_shift=0.02, pos_intra_shift=0.08,
    ),
    "train_config_active": dict(  # "IAROA vit small 1/31/22" (the yml's uncommented values)
        neg_inter_weight=0.63, pos_inter_weight=0.25, pos_intra_weight=0.67,
        neg_inter_shift=0.46, pos_inter_shift=0.12, pos_intra_shift=0.18,
    ),
}
_DEFAULT_LOSS = STEGO_LOSS_PRESETS["cocostuff27_vit_base"]


@dataclass(frozen=True)
class StegoTrainConfig:
    """STEGO's training knobs (train_config.yml names in brackets where they differ).

    Defaults: train_config.yml for the shape of the run (dim 70, 27 classes, lr 5e-4, batch 16, 5000
    steps, 7 neighbours, 11x11 samples, 5 negatives, pointwise, zero_clamp, dropout) and the
    cocostuff27 ViT-B shifts/weights (see STEGO_LOSS_PRESETS). The probe's lr 5e-3 is hard-coded in
    STEGO's configure_optimizers.
    """

    code_dim: int = 70  # [dim]
    n_classes: int = 27
    extra_clusters: int = 0  # the cluster probe has n_classes + extra_clusters centres
    lr: float = 5e-4
    probe_lr: float = 5e-3
    batch_size: int = 16
    max_steps: int = 5000
    num_neighbors: int = 7
    feature_samples: int = 11
    neg_samples: int = 5
    pointwise: bool = True
    zero_clamp: bool = True
    stabilize: bool = False  # [stabalize]
    dropout: bool = True  # Dropout2d also on the features the loss compares (STEGO cfg.dropout)
    dropout_p: float = 0.1  # DinoFeaturizer's Dropout2d(p=.1)
    correspondence_weight: float = 1.0
    pos_intra_weight: float = _DEFAULT_LOSS["pos_intra_weight"]
    pos_inter_weight: float = _DEFAULT_LOSS["pos_inter_weight"]
    neg_inter_weight: float = _DEFAULT_LOSS["neg_inter_weight"]
    pos_intra_shift: float = _DEFAULT_LOSS["pos_intra_shift"]
    pos_inter_shift: float = _DEFAULT_LOSS["pos_inter_shift"]
    neg_inter_shift: float = _DEFAULT_LOSS["neg_inter_shift"]
    crop_ratio: float = 0.5
    res: int = 224

    def __post_init__(self) -> None:
        ints = ("code_dim", "n_classes", "batch_size", "max_steps", "num_neighbors", "feature_samples")
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"StegoTrainConfig.{name} must be a positive integer, got {value!r}")
        for name in ("extra_clusters", "neg_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"StegoTrainConfig.{name} must be a non-negative integer, got {value!r}")
        for name in ("pointwise", "zero_clamp", "stabilize", "dropout"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"StegoTrainConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("lr", "probe_lr"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"StegoTrainConfig.{name} must be a positive finite number, got {value!r}")
        weights = ("correspondence_weight", "pos_intra_weight", "pos_inter_weight", "neg_inter_weight")
        for name in weights:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"StegoTrainConfig.{name} must be a finite number >= 0, got {value!r}")
        for name in ("pos_intra_shift", "pos_inter_shift", "neg_inter_shift"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value)):
                raise ValueError(f"StegoTrainConfig.{name} must be a finite number, got {value!r}")
        if not (isinstance(self.dropout_p, int | float) and 0.0 <= self.dropout_p < 1.0):
            raise ValueError(f"StegoTrainConfig.dropout_p must be in [0, 1), got {self.dropout_p!r}")
        if not (isinstance(self.crop_ratio, int | float) and 0.0 < self.crop_ratio <= 1.0):
            raise ValueError(f"StegoTrainConfig.crop_ratio must be in (0, 1], got {self.crop_ratio!r}")
        if isinstance(self.res, bool) or not isinstance(self.res, int) or self.res <= 0:
            raise ValueError(f"StegoTrainConfig.res must be a positive integer, got {self.res!r}")
        if self.neg_samples > 0 and self.batch_size < 2:
            raise ValueError("StegoTrainConfig.batch_size must be >= 2 when neg_samples > 0 (negatives: other images)")

    @property
    def n_clusters(self) -> int:
        return self.n_classes + self.extra_clusters

    @classmethod
    def from_preset(cls, name: str, **overrides) -> StegoTrainConfig:
        """Defaults with one of STEGO_LOSS_PRESETS' shift/weight sets, then `overrides`."""
        if name not in STEGO_LOSS_PRESETS:
            raise ValueError(f"unknown STEGO preset {name!r}; known: {sorted(STEGO_LOSS_PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown StegoTrainConfig fields {unknown}")
        return cls(**{**STEGO_LOSS_PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Contrastive correlation loss
# --------------------------------------------------------------------------------------------------


def _norm(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t, dim=1, eps=_NORM_EPS)


def tensor_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dot product of every location of `a` with every location of `b`, per batch item: [B, h, w, i, j]."""
    return torch.einsum("nchw,ncij->nhwij", a, b)


def sample_at(t: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """STEGO's `sample`: bilinear grid_sample at coords [B, S1, S2, 2] in [-1, 1] (x, y), border padding.

    The coordinates are transposed to [B, S2, S1, 2] first, as STEGO does, so the output is [B, C, S2, S1].
    """
    return F.grid_sample(t, coords.permute(0, 2, 1, 3), padding_mode="border", align_corners=True)


def super_perm(size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
    """STEGO's negative pairing: a random permutation whose fixed points are bumped to the next index.

    Not a permutation any more (a bumped entry may repeat another), but nobody is paired with itself
    when size >= 2.
    """
    perm = torch.randperm(size, device=device, dtype=torch.long, generator=generator)
    perm[perm == torch.arange(size, device=device)] += 1
    return perm % size


def correlation_term(
    f1: torch.Tensor,
    f2: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    shift: float,
    *,
    pointwise: bool,
    zero_clamp: bool,
    stabilize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One STEGO correlation term: (loss [B, h, w, i, j], code correlation cd [B, h, w, i, j]).

    fd = cos(f1, f2) over all location pairs (no gradient: the backbone is frozen), optionally with
    each source location's mean over targets removed and the global mean restored (pointwise);
    cd = cos(c1, c2); loss = -clamp(cd, lo[, 0.8]) * (fd - shift), lo = 0 with zero_clamp else -9999,
    the upper clamp at 0.8 only with stabilize (STEGO's `stabalize`).
    """
    with torch.no_grad():
        fd = tensor_correlation(_norm(f1), _norm(f2))
        if pointwise:
            old_mean = fd.mean()
            fd = fd - fd.mean([3, 4], keepdim=True)
            fd = fd - fd.mean() + old_mean
    cd = tensor_correlation(_norm(c1), _norm(c2))
    min_val = 0.0 if zero_clamp else -9999.0
    clamped = cd.clamp(min_val, 0.8) if stabilize else cd.clamp(min_val)
    return -clamped * (fd - shift), cd


@dataclass
class CorrelationLoss:
    """Terms of ContrastiveCorrelationLoss.forward, same reductions (negatives left unreduced, as STEGO)."""

    pos_intra_loss: torch.Tensor  # scalar (mean)
    pos_intra_cd: torch.Tensor  # [B, S, S, S, S]
    pos_inter_loss: torch.Tensor  # scalar (mean)
    pos_inter_cd: torch.Tensor
    neg_inter_loss: torch.Tensor  # [neg_samples * B, S, S, S, S]
    neg_inter_cd: torch.Tensor

    def weighted(self, cfg: StegoTrainConfig) -> torch.Tensor:
        """The head's loss as in training_step: weighted sum of the three means times correspondence_weight."""
        neg = self.neg_inter_loss.mean() if self.neg_inter_loss.numel() else self.pos_intra_loss.new_zeros(())
        return (
            cfg.pos_inter_weight * self.pos_inter_loss
            + cfg.pos_intra_weight * self.pos_intra_loss
            + cfg.neg_inter_weight * neg
        ) * cfg.correspondence_weight


def _check_pair(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.ndim != 4 or a.shape != b.shape:
        raise ValueError(
            f"{name} and {name}_pos must be [B, C, h, w] of one shape, got {tuple(a.shape)}, {tuple(b.shape)}"
        )


def contrastive_correlation_loss(
    feats: torch.Tensor,
    feats_pos: torch.Tensor,
    code: torch.Tensor,
    code_pos: torch.Tensor,
    cfg: StegoTrainConfig,
    *,
    generator: torch.Generator | None = None,
    coords: tuple[torch.Tensor, torch.Tensor] | None = None,
    perms: Sequence[torch.Tensor] | None = None,
) -> CorrelationLoss:
    """STEGO's ContrastiveCorrelationLoss.forward (use_salience False).

    Samples an S x S grid (S = feature_samples) of random points per image (coords1) and per kNN
    positive (coords2), then compares: the image with itself (pos intra), the image with its kNN image
    (pos inter), and `neg_samples` times the image with a `super_perm` shuffle of the batch sampled at
    coords2 (neg inter). Draw order matches STEGO: coords1, coords2, then one permutation per negative.
    `coords` (two [B, S, S, 2] tensors in [-1, 1]) and `perms` (neg_samples LongTensors [B]) replace
    the random draws, for parity tests.
    """
    _check_pair("feats", feats, feats_pos)
    _check_pair("code", code, code_pos)
    if feats.shape[0] != code.shape[0]:
        raise ValueError(f"feats and code batch sizes differ: {feats.shape[0]} vs {code.shape[0]}")
    batch, device = feats.shape[0], feats.device
    _check_generator(generator, device)
    if cfg.neg_samples > 0 and batch < 2:
        raise ValueError("negatives need a batch of at least 2 images")
    shape = (batch, cfg.feature_samples, cfg.feature_samples, 2)
    if coords is None:
        coords1 = torch.rand(shape, device=device, generator=generator) * 2 - 1
        coords2 = torch.rand(shape, device=device, generator=generator) * 2 - 1
    else:
        coords1, coords2 = coords
        for c in (coords1, coords2):
            if c.ndim != 4 or c.shape[0] != batch or c.shape[-1] != 2:
                raise ValueError(f"coords must be two [B={batch}, S1, S2, 2] tensors, got {tuple(c.shape)}")
    if perms is not None:
        perms = list(perms)
        if len(perms) != cfg.neg_samples:
            raise ValueError(f"perms must hold neg_samples={cfg.neg_samples} index tensors, got {len(perms)}")
        for p in perms:
            if p.shape != (batch,) or p.dtype != torch.long:
                raise ValueError(
                    f"each perm must be an int64 tensor of shape ({batch},), got {p.dtype} {tuple(p.shape)}"
                )

    flags = dict(pointwise=cfg.pointwise, zero_clamp=cfg.zero_clamp, stabilize=cfg.stabilize)
    f1, c1 = sample_at(feats, coords1), sample_at(code, coords1)
    f2, c2 = sample_at(feats_pos, coords2), sample_at(code_pos, coords2)
    pos_intra_loss, pos_intra_cd = correlation_term(f1, f1, c1, c1, cfg.pos_intra_shift, **flags)
    pos_inter_loss, pos_inter_cd = correlation_term(f1, f2, c1, c2, cfg.pos_inter_shift, **flags)

    neg_losses, neg_cds = [], []
    for i in range(cfg.neg_samples):
        perm = perms[i].to(device) if perms is not None else super_perm(batch, device, generator)
        f_neg, c_neg = sample_at(feats[perm], coords2), sample_at(code[perm], coords2)
        loss, cd = correlation_term(f1, f_neg, c1, c_neg, cfg.neg_inter_shift, **flags)
        neg_losses.append(loss)
        neg_cds.append(cd)
    if neg_losses:
        neg_inter_loss, neg_inter_cd = torch.cat(neg_losses, dim=0), torch.cat(neg_cds, dim=0)
    else:
        neg_inter_loss = neg_inter_cd = pos_intra_cd.new_zeros((0, *pos_intra_cd.shape[1:]))
    return CorrelationLoss(
        pos_intra_loss.mean(), pos_intra_cd, pos_inter_loss.mean(), pos_inter_cd, neg_inter_loss, neg_inter_cd
    )


# --------------------------------------------------------------------------------------------------
# Training step
# --------------------------------------------------------------------------------------------------


def make_stego_optimizers(head: StegoHead, cfg: StegoTrainConfig) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """STEGO's configure_optimizers minus the linear probe: Adam(lr) on the projection, Adam(probe_lr) on centres."""
    return (
        torch.optim.Adam(head.projection_parameters(), lr=cfg.lr),
        torch.optim.Adam(list(head.cluster_probe.parameters()), lr=cfg.probe_lr),
    )


def stego_train_step(
    head: StegoHead,
    optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
    feats: torch.Tensor,
    feats_pos: torch.Tensor,
    *,
    loss_cfg: StegoTrainConfig,
    generator: torch.Generator | None = None,
    reduce_gradients: Callable[[], None] | None = None,
) -> dict[str, float]:
    """One STEGO training step on backbone features of a batch and of each image's kNN positive.

    ``reduce_gradients`` runs between the backward pass and the optimiser steps: data-parallel training
    averages the gradients across ranks there (the step is then that of the union of the ranks' batches).

    Order as LitUnsupervisedSegmenter.training_step: zero both optimisers; code of the batch then of the
    positives (train-mode dropout, one draw per branch, then one on the features the loss compares when
    cfg.dropout); weighted correlation loss; cluster probe loss on a detached copy of the code (so it
    only moves the centres); one backward of the sum; step the projection, then the probe.
    Returns the logged values under STEGO's names (loss/total here has no linear-probe term).
    """
    if len(optimizers) != 2:
        raise ValueError("optimizers must be (projection optimiser, cluster-probe optimiser)")
    if feats.shape != feats_pos.shape:
        raise ValueError(f"feats and feats_pos must have one shape, got {tuple(feats.shape)}, {tuple(feats_pos.shape)}")
    if loss_cfg.n_clusters != head.n_clusters or loss_cfg.code_dim != head.code_dim:
        raise ValueError(
            f"loss_cfg (code_dim={loss_cfg.code_dim}, clusters={loss_cfg.n_clusters}) does not match the head "
            f"(code_dim={head.code_dim}, clusters={head.n_clusters})"
        )
    net_optim, probe_optim = optimizers
    head.train()
    net_optim.zero_grad(set_to_none=True)
    probe_optim.zero_grad(set_to_none=True)

    feats, feats_pos = feats.detach(), feats_pos.detach()
    code = head(feats, generator)
    signal = head.dropout_features(feats, generator) if loss_cfg.dropout else feats
    code_pos = head(feats_pos, generator)
    signal_pos = head.dropout_features(feats_pos, generator) if loss_cfg.dropout else feats_pos

    terms = contrastive_correlation_loss(signal, signal_pos, code, code_pos, loss_cfg, generator=generator)
    corr = terms.weighted(loss_cfg)
    cluster_loss, _ = head.probe_loss(code.detach().clone())
    total = corr + cluster_loss
    if not torch.isfinite(total):
        raise FloatingPointError(f"STEGO loss is not finite ({total.item()}); check the features for NaN/inf")
    total.backward()
    if reduce_gradients is not None:
        reduce_gradients()
    net_optim.step()
    probe_optim.step()

    def mean(t: torch.Tensor) -> float:
        return float(t.detach().mean()) if t.numel() else 0.0

    return {
        "loss/pos_intra": mean(terms.pos_intra_loss),
        "loss/pos_inter": mean(terms.pos_inter_loss),
        "loss/neg_inter": mean(terms.neg_inter_loss),
        "loss/correlation": mean(corr),
        "loss/cluster": mean(cluster_loss),
        "loss/total": mean(total),
        "cd/pos_intra": mean(terms.pos_intra_cd),
        "cd/pos_inter": mean(terms.pos_inter_cd),
        "cd/neg_inter": mean(terms.neg_inter_cd),
    }
