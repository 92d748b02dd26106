"""Typed, validated configuration for every stage.

One YAML file (or none: the defaults run on a laptop) plus dotted command-line overrides
(``extract.tau=0.2``) resolve to a :class:`U2SegConfig`. Every knob is declared once, here, with its
default, its documentation and its check; a bad value raises :class:`ConfigError` naming the key,
the value and what is allowed. The resolved config and its hash go to the run root so a finished
stage can tell whether a rerun asks for the same work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import yaml

from u2seg.errors import UserError


class ConfigError(ValueError, UserError):
    """A config key holds a value that is not allowed; the message names key, value and rule."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config error: {key}={value!r} is not allowed; expected {allowed}")


def knob(default: Any, doc: str, check: Callable[[Any], bool] | None = None, allowed: str = "") -> Any:
    """Declare a config field with its documentation and validity rule in one place."""
    meta = {"doc": doc, "check": check, "allowed": allowed}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def _positive(v: Any) -> bool:
    return v > 0


def _non_negative(v: Any) -> bool:
    return v >= 0


def _fraction(v: Any) -> bool:
    return 0.0 <= v <= 1.0


@dataclass
class StorageConfig:
    """Object-storage access. Empty fields fall back to the standard AWS environment/credential chain."""

    endpoint_url: str | None = knob(None, "S3 endpoint (e.g. http://127.0.0.1:8333 for SeaweedFS/MinIO); "
                                    "default: $AWS_ENDPOINT_URL or AWS")
    key: str | None = knob(None, "access key id; default: $AWS_ACCESS_KEY_ID / credential chain")
    secret: str | None = knob(None, "secret access key; never logged; default: $AWS_SECRET_ACCESS_KEY")
    region: str | None = knob(None, "region name; default: $AWS_REGION / $AWS_DEFAULT_REGION")
    anon: bool = knob(False, "anonymous access to public buckets")
    retry_s: float = knob(120.0, "how long a worker keeps retrying a read of an input image or a write to the "
                          "run root that failed with a transient error (endpoint down, connection reset, "
                          "timeout) before its task fails; permanent errors (no such key or bucket, access "
                          "denied) are never retried; 0 = no retry", _non_negative, ">= 0")

    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs keyword arguments for ``s3://`` URIs."""
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        opts: dict[str, Any] = {"anon": self.anon}
        if self.key:
            opts["key"] = self.key
        if self.secret:
            opts["secret"] = self.secret
        client_kwargs: dict[str, Any] = {}
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        region = self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            client_kwargs["region_name"] = region
        if client_kwargs:
            opts["client_kwargs"] = client_kwargs
        return opts


@dataclass
class RunConfig:
    """Where a run lives and how it runs."""

    run_root: str = knob("./runs/demo", "run root: a local path or s3://bucket/prefix; every stage "
                         "output lives under it", lambda v: bool(str(v).strip()), "a non-empty path or URI")
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray_address: str | None = knob(None, "Ray cluster to join ('auto', 'ray://host:10001'); None starts "
                                   "a local Ray (or joins the one `ray job submit` provides)")
    ray_num_cpus: int | None = knob(None, "logical CPUs for a local Ray started by u2seg; None = Ray's "
                                    "default. Use more than the real cores on tiny machines",
                                    lambda v: v is None or v > 0, "None or a positive integer")
    device: Literal["auto", "cpu", "cuda"] = knob("auto", "compute device; auto = cuda when present")
    seed: int = knob(0, "seed for every random choice (init, sampling, augmentation)", _non_negative,
                     ">= 0")
    max_error_fraction: float = knob(0.05, "a stage fails loudly at the end if more than this fraction "
                                     "of inputs became error rows", _fraction, "a fraction in [0, 1]")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = knob("INFO", "logging level")
    lease_s: float = knob(120.0, "one driver at a time per run root: a driver holds a lease in the run root "
                          "(renewed every lease_s/4 seconds); another driver fails at once, naming the owner and "
                          "when the lease expires (or waits with --wait); a killed driver's lease is taken over "
                          "once it is lease_s seconds old", lambda v: v >= 5, ">= 5 seconds")
    progress_every_s: float = knob(30.0, "while a stage's long loop runs (extract, label, predict, cluster's "
                                   "assignment pass, the stuff descriptors, training steps), the driver rewrites "
                                   "<stage folder>/_PROGRESS.json (phase, done, total, unit, errors by reason, rate, "
                                   "eta_s, finished) at most every this many seconds, and once more when the loop "
                                   "ends; training reports at its checkpoints (train.checkpoint_every); "
                                   "0 = at every update", _non_negative, ">= 0 seconds")


@dataclass
class ManifestConfig:
    """Which images a run reads."""

    inputs: list[str] = knob([], "image sources: local folders, s3:// prefixes, or list files "  # noqa: RUF009
                             "(.txt with one URI per line, or .parquet with a 'uri' column)")
    recursive: bool = knob(True, "descend into sub-folders / sub-prefixes")
    rows_per_part: int = knob(10_000, "images per manifest Parquet part (bounds memory while listing)",
                              _positive, "a positive integer")
    list_concurrency: int = knob(8, "prefixes listed in parallel", _positive, "a positive integer")
    probe_sizes: bool = knob(False, "read each image header to fill width/height (costs one small read "
                             "per image); off: filled by extract")
    refresh: bool = knob(True, "relist the sources on every run, so a changed folder or bucket changes the manifest "
                         "(new images are extracted, removed ones leave every output); off: a finished manifest "
                         "is kept as it is")


@dataclass
class StuffConfig:
    """Stuff classes: STEGO's head and cluster probe trained on frozen backbone features (or the k-means baseline).

    The head reads the final patch tokens of ``extract.backbone`` (the same pass that feeds MaskCut applies
    it); its defaults are STEGO's (train_config.yml and the cocostuff27 ViT-B shifts and weights).
    """

    method: Literal["stego", "kmeans"] = knob("stego", "stego: STEGO's contrastive head + cosine cluster probe "
                                              "(U2Seg's stuff); kmeans: spherical k-means of pooled, randomly "
                                              "projected patch tokens (the cheap baseline; cluster.stuff_k classes)")
    checkpoint: str | None = knob(None, "a trained head to load instead of training (local path or s3://): a STEGO "
                                  "Lightning checkpoint's state dict (net.cluster1.*, net.cluster2.*, "
                                  "cluster_probe.clusters) or a u2seg stuff/head.pt")
    train_images: int = knob(10_000, "images sampled from the manifest (by a seeded hash of their id) to train on",
                             _positive, "a positive integer")
    k: int = knob(27, "stuff classes: the cluster probe's centres (COCO-Stuff-27 has 27)", lambda v: 2 <= v <= 255,
                  "an integer in [2, 255]")
    code_dim: int = knob(70, "dimensions of STEGO's code", _positive, "a positive integer")
    steps: int = knob(5000, "optimizer steps", _positive, "a positive integer")
    batch_size: int = knob(16, "crops per step per worker (each with its kNN positive)", lambda v: v >= 2, ">= 2")
    lr: float = knob(5e-4, "Adam learning rate of the head", _positive, "> 0")
    probe_lr: float = knob(5e-3, "Adam learning rate of the cluster probe (STEGO's)", _positive, "> 0")
    crop_ratio: float = knob(0.5, "STEGO's five crops: each crop's side as a fraction of the image's",
                             lambda v: 0 < v <= 1, "a fraction in (0, 1]")
    crop_size: int = knob(224, "crops are resized (shorter side) and centre-cropped to this many pixels",
                          lambda v: 32 <= v <= 1024, "an integer in [32, 1024]")
    neighbors: int = knob(7, "kNN positives per crop (by cosine of the global descriptor)", _positive,
                          "a positive integer")
    preset: Literal["cocostuff27_vit_base", "cocostuff27_vit_small", "train_config_active"] = knob(
        "cocostuff27_vit_base", "STEGO's loss shifts and weights (u2seg/stuff/stego.py::STEGO_LOSS_PRESETS)")
    num_workers: int = knob(1, "Ray Train workers (DDP ranks) training the head", _positive, "a positive integer")


@dataclass
class ExtractConfig:
    """Backbone features and MaskCut."""

    backbone: str = knob("vit_base_patch8_224.dino", "timm ViT name (DINO ViT-B/8 is the method's default)",
                         lambda v: bool(v), "a timm model name")
    weights: str = knob("none", "'none' (random init, seeded), 'timm' (pretrained tag, needs the hub), "
                        "or a local path / s3:// URI to .safetensors or a torch state dict")
    max_side: int = knob(1024, "decoded images whose longer side exceeds this are downscaled (area) before they "
                         "reach the MaskCut actors: refinement and object crops work on that copy, masks are still "
                         "written at the image's full size; 0 = send full-resolution images (more object-store "
                         "traffic per image)", lambda v: v == 0 or v >= 64, "0 or an integer >= 64")
    image_size: int = knob(480, "square input size in pixels; must be a multiple of the patch size",
                           lambda v: 32 <= v <= 2048, "an integer in [32, 2048]")
    tau: float = knob(0.15, "MaskCut affinity threshold on cosine similarity", lambda v: -1.0 <= v < 1.0,
                      "a float in [-1, 1)")
    n_masks: int = knob(3, "MaskCut masks per image (cuts)", lambda v: 1 <= v <= 20, "an integer in [1, 20]")
    solver: Literal["lanczos", "dense"] = knob("lanczos", "eigen-solver; dense = the reference's exact "
                                               "scipy eigh (slow, for comparison)")
    refine: Literal["none", "guided"] = knob("none", "mask refinement at image resolution; guided = "
                                             "edge-aware guided filter (stands in for the reference CRF)")
    batch_size: int = knob(4, "images per backbone+MaskCut batch", _positive, "a positive integer")
    num_actors: int = knob(1, "MaskCut actors at most (one per GPU on GPU clusters)", _positive,
                           "a positive integer")
    min_actors: int = knob(1, "MaskCut actors to start with: a cold autoscaling cluster starts working with what it "
                           "has and grows the pool up to extract.num_actors", _positive, "a positive integer")
    gpus_per_actor: float = knob(0.0, "GPUs per actor; 0 on CPU. auto device + GPUs present -> set 1",
                                 _non_negative, ">= 0")
    cpus_per_actor: float = knob(1.0, "CPUs reserved per actor", _positive, "> 0")
    descriptor: Literal["crop_cls", "mask_pool"] = knob(
        "crop_cls", "thing descriptor: crop_cls = the backbone's CLS (after the final norm) on each object's masked "
        "crop (U2Seg's); mask_pool = the mean of the image's patch tokens under the mask (no second pass)")
    crop_context: float = knob(0.1, "crop_cls: margin added around a mask's box on each side, as a fraction of the "
                               "box's longer side", lambda v: 0 <= v <= 2, "a number in [0, 2]")
    crop_size: int = knob(224, "crop_cls: side of the object crops fed to the backbone",
                          lambda v: 32 <= v <= 1024, "an integer in [32, 1024]")
    patches_per_image: int = knob(64, "stuff.method=kmeans: sampled patch features per image for stuff clustering",
                                  _non_negative, ">= 0")
    stuff_grid: int = knob(32, "stuff.method=kmeans: side of the pooled patch-feature grid stored per image",
                           lambda v: 4 <= v <= 128, "an integer in [4, 128]")
    stuff_dim: int = knob(32, "stuff.method=kmeans: dimensions of the stored stuff features (a fixed random "
                          "orthogonal projection of the pooled tokens)", lambda v: 4 <= v <= 1024,
                          "an integer in [4, 1024]")
    amp: Literal["bf16", "fp16", "none"] = knob("bf16", "autocast dtype on GPU (CPU always runs fp32)")
    rows_per_part: int = knob(256, "images per output Parquet part (a unit of retry and resume)",
                              _positive, "a positive integer")


@dataclass
class ClusterConfig:
    """k-means for pseudo thing classes (mask descriptors) and stuff classes (patch features)."""

    things_k: int = knob(800, "pseudo thing classes (U2Seg: 800; 300 also used)", _positive,
                         "a positive integer")
    stuff_k: int = knob(27, "stuff.method=kmeans: pseudo stuff classes (COCO-Stuff has 27 coarse classes)",
                        _positive, "a positive integer")
    niter: int = knob(20, "Lloyd iterations", _positive, "a positive integer")
    num_shards: int = knob(2, "shard actors of the distributed k-means", _positive, "a positive integer")
    spherical: bool = knob(True, "cosine geometry: L2-normalised vectors and centroids")
    max_points_per_centroid: int = knob(256, "init sample size cap per centroid, as faiss", _positive,
                                        "a positive integer")
    tol: float = knob(1e-4, "stop when the relative inertia change falls below this", _non_negative, ">= 0")
    refit: Literal["assign_new", "always"] = knob("assign_new", "on a rerun over changed inputs: assign_new keeps "
                                                  "the existing centroids and assigns only new masks (pseudo-class "
                                                  "ids stay stable for users); always refits on all masks and every "
                                                  "label is rebuilt")


@dataclass
class LabelConfig:
    """Stuff maps, panoptic merge and output formats."""

    stuff_smooth: int = knob(3, "median smoothing window of the stuff map (odd; 0/1 = none)",
                             lambda v: v in (0, 1) or (v > 1 and v % 2 == 1), "0, 1 or an odd integer > 1")
    min_stuff_area: float = knob(0.002, "stuff fragments below this fraction of the image become void (U2Seg: 0)",
                                 _fraction, "a fraction in [0, 1]")
    min_thing_area: int = knob(16, "thing masks below this many visible pixels are dropped (U2Seg: 0)",
                               _non_negative, ">= 0")
    thing_order: Literal["score", "bbox_area"] = knob(
        "score", "paint order of things: score = descending MaskCut score, earlier things win overlaps; "
        "bbox_area = U2Seg's: descending bbox area, a smaller thing overwriting a larger one")
    stuff_overlap_drop: float | None = knob(None, "U2Seg's rule: a stuff class with more than this fraction of its "
                                            "pixels under things is left out of the image (its free pixels void; "
                                            "U2Seg: 0.7); null = off", lambda v: 0 <= v <= 1,
                                            "null or a fraction in [0, 1]")
    write_semantic: bool = knob(True, "also write labels/semantic/*.png (category id per pixel)")
    coco_max_images: int = knob(
        50_000, "label sets of at most this many images also get merged single-file COCO panoptic.json / "
        "instances.json (label, predict, self-training; larger ones only their Parquet parts: `u2seg export coco` "
        "writes the files for any set or subset). It changes no label, so it is in no stage hash: a finished "
        "stage is not rerun for it (`u2seg label --force` re-merges without relabelling)", _non_negative, ">= 0")


def _ascending_steps(v: Any) -> bool:
    return all(s > 0 for s in v) and all(a < b for a, b in itertools.pairwise(v))


@dataclass
class TrainConfig:
    """Self-training of the universal segmentation model on Ray Train.

    The recipe knobs (optimizer, schedule, clipping, heads, AMP) default to u2seg's small-run recipe (AdamW
    at a constant lr); ``u2seg/configs/coco.yaml`` sets U2Seg's (u2seg_R50_800.yaml with Detectron2's
    defaults, ``u2seg.model.optim.U2SEG_SOLVER``).
    """

    backbone: str = knob("vit_small_patch8_224.dino", "timm backbone of the model: a ViT (simple feature "
                         "pyramid) or a CNN such as resnet50 (FPN; U2Seg's is DINO's ResNet-50)")
    weights: str = knob("none", "backbone weights, as extract.weights; a CNN takes a torchvision-layout "
                        "checkpoint (e.g. DINO's dino_resnet50_pretrain.pth), a local path or s3:// URI")
    image_size: int = knob(512, "training image side (longest side after resize)", lambda v: 64 <= v <= 2048,
                           "an integer in [64, 2048]")
    num_workers: int = knob(1, "Ray Train workers (DDP ranks); the global batch is num_workers x batch_size",
                            _positive, "a positive integer")
    use_gpu: Literal["auto", "yes", "no"] = knob("auto", "train on GPUs (auto = when the cluster has them)")
    batch_size: int = knob(2, "images per worker per step", _positive, "a positive integer")
    steps: int = knob(1000, "optimizer steps per round", _positive, "a positive integer")
    optimizer: Literal["sgd", "adamw"] = knob(
        "adamw", "sgd (momentum, U2Seg's / Detectron2's) or adamw; either over Detectron2's parameter groups: "
        "normalisation layers get no weight decay")
    lr: float = knob(1e-4, "base learning rate, before warmup and decay (U2Seg: 0.01 with sgd)", _positive, "> 0")
    momentum: float = knob(0.9, "SGD momentum (U2Seg: 0.9); adamw ignores it", lambda v: 0 <= v < 1,
                           "a number in [0, 1)")
    weight_decay: float = knob(0.05, "weight decay of all but normalisation layers (U2Seg: 5e-5)", _non_negative,
                               ">= 0")
    warmup_steps: int = knob(0, "linear warmup from warmup_factor x lr at step 0 to lr at this step "
                             "(U2Seg: 1000); 0 = none", _non_negative, ">= 0")
    warmup_factor: float = knob(0.001, "the warmup's starting fraction of lr (U2Seg: 1/1000)", _fraction,
                                "a fraction in [0, 1]")
    lr_steps: list[int] = knob([], "steps from which the lr is multiplied by lr_gamma once more (U2Seg: "  # noqa: RUF009
                               "[210000, 250000] of 270000); ascending, each below train.steps; [] = no decay",
                               _ascending_steps, "a strictly ascending list of positive integers")
    lr_gamma: float = knob(0.1, "lr factor at each of lr_steps (U2Seg: 0.02)", _positive, "> 0")
    clip: Literal["global", "per_param"] = knob(
        "global", "gradient clipping to clip_norm: global = the norm of all gradients together; per_param = each "
        "parameter tensor on its own (Detectron2's CLIP_GRADIENTS, U2Seg's)")
    clip_norm: float = knob(1.0, "max L2 norm of the clipped gradients (U2Seg: 1.0)", _positive, "> 0")
    amp: Literal["bf16", "fp16", "none"] = knob(
        "bf16", "mixed precision on GPU (CPU trains in fp32): bf16 autocast; fp16 autocast with a grad scaler "
        "(Detectron2's AMP); none")
    roi_heads: Literal["standard", "cascade"] = knob(
        "standard", "box heads: standard = one Fast R-CNN head (Mask R-CNN); cascade = Cascade R-CNN's three "
        "stages at IoU 0.5/0.6/0.7 (U2Seg's, CutLER's)")
    semantic_loss_weight: float = knob(0.5, "weight of the semantic head's loss (Panoptic FPN's, U2Seg's: 0.5)",
                                       _non_negative, ">= 0")
    roi_batch_size: int = knob(512, "proposals sampled per image for the ROI box loss (Detectron2's, U2Seg's: "
                               "512); fewer make CPU steps cheaper", _positive, "a positive integer")
    fpn_channels: int = knob(256, "channels of the feature pyramid and the mask head (Detectron2's: 256)",
                             _positive, "a positive integer")
    box_head_dim: int = knob(1024, "width of the box head's two fully connected layers (Detectron2's: 1024)",
                             _positive, "a positive integer")
    mask_head_convs: int = knob(4, "3x3 convolutions of the mask head (Mask R-CNN's: 4)", _positive,
                                "a positive integer")
    checkpoint_every: int = knob(100, "steps between checkpoints", _positive, "a positive integer")
    max_failures: int = knob(2, "worker failures tolerated (resume from last checkpoint)", _non_negative,
                             ">= 0")
    drop_loss_iou: float = knob(0.01, "CutLER's DropLoss: no classification loss for proposals whose best IoU "
                                "with a pseudo box is at most this; 0 = off (U2Seg trains without it)",
                                lambda v: 0 <= v < 0.5, "a number in [0, 0.5)")
    copy_paste: bool = knob(True, "copy-paste augmentation of pseudo instances")
    images_without_things: Literal["skip", "train"] = knob(
        "skip", "labelled images with no thing segment: skip = left out of training, as U2Seg drops them (they stay "
        "in the labels); train = kept (they still teach the semantic head)")
    rounds: int = knob(1, "self-training rounds after the first training", _non_negative, ">= 0")
    score_threshold: float = knob(0.7, "self-training (CutLER's rule): predictions scoring at least this become "
                                  "the next round's pseudo things (CutLER: 0.7)", _fraction, "a fraction in [0, 1]")
    selftrain_iou: float = knob(0.5, "self-training: a previous pseudo thing is kept only while its mask IoU with "
                                "every such prediction is below this (CutLER: 0.5)", _fraction,
                                "a fraction in [0, 1]")
    selftrain_pred_nms: float = knob(0.0, "self-training: among the confident predictions of an image, one whose "
                                     "mask IoU with a higher-scoring one exceeds this is dropped (a multi-class "
                                     "detector's per-class box NMS leaves nested boxes around one object); 0 = off, "
                                     "as CutLER", _fraction, "a fraction in [0, 1]")
    selftrain_stuff: Literal["labels", "model"] = knob(
        "labels", "self-training: the stuff under the new things comes from the previous round's labels (the "
        "pseudo stuff, unchanged) or from the model's semantic head on the image (its argmax); things and stuff "
        "are merged with the label stage's rules (label.thing_order, label.stuff_overlap_drop, min areas)")
    mlflow_uri: str | None = knob(None, "MLflow tracking URI (http://host:5000, file:///path, databricks): rank 0 "
                                  "also logs the training scalars of every round and of the stuff head there, one "
                                  "MLflow run each (TensorBoard event files go to the run root always); needs the "
                                  "mlflow package (pip install mlflow); in no stage hash")



@dataclass
class PredictConfig:
    """Batch inference of a trained model: the predict stage and self-training's predictions."""

    batch_size: int = knob(4, "images per model call (a failing call is split down to single images)", _positive,
                           "a positive integer")
    rows_per_part: int = knob(64, "images per committed group (a unit of retry and resume)", _positive,
                              "a positive integer")
    num_actors: int = knob(1, "predict actors at most (one per GPU on GPU clusters)", _positive, "a positive integer")
    min_actors: int = knob(1, "predict actors to start with (the pool grows up to predict.num_actors)", _positive,
                           "a positive integer")
    gpus_per_actor: float = knob(0.0, "GPUs per actor; 0 = one when the cluster has GPUs, else CPU", _non_negative,
                                 ">= 0")
    cpus_per_actor: float = knob(1.0, "CPUs reserved per actor", _positive, "> 0")
    panoptic_score_threshold: float = knob(
        0.5, "detections scoring at least this are painted into the panoptic prediction (Panoptic FPN's combine "
        "threshold, U2Seg's: 0.5); a briefly trained model scores lower; the instances keep every detection",
        _fraction, "a fraction in [0, 1]")


@dataclass
class EvaluateConfig:
    """Evaluation against a labeled set (optional: no ground truth, no evaluate stage)."""

    gt_instances_json: str | None = knob(None, "COCO instances JSON (path/URI)")
    gt_panoptic_json: str | None = knob(None, "COCO panoptic JSON (path/URI)")
    gt_panoptic_dir: str | None = knob(None, "folder of COCO panoptic PNGs (path/URI)")
    images: list[str] = knob([], "the labeled set's images (folders, s3:// prefixes or list files): the trained "  # noqa: RUF009
                             "model predicts on them and is scored there, a held-out set it never trained on "
                             "(e.g. COCO val2017); empty = the model predicts on its training images")
    protocols: list[Literal["hungarian", "majority", "u2seg"]] = knob(  # noqa: RUF009
        ["hungarian", "u2seg"],
        "evaluation protocols, each scored on its own (metrics.json holds one block per protocol, the first "
        "leads the stage's stats): hungarian = one-to-one pseudo->gt mapping by pixel overlap (things to "
        "things, stuff to stuff), PQ with stuff merged per class, mIoU with unmapped pixels as misses, mask "
        "and box AP (class-aware and class-agnostic); majority = the same with a many-to-one mapping (each "
        "pseudo class -> the gt class it overlaps most); u2seg = U2Seg's own evaluation code: things mapped "
        "by votes of detections scoring >= 0.6 with box IoU > 0.7, stuff by per-image IoU > 0.15 votes, "
        "many-to-one, PQ with mapped stuff segments kept apart, mIoU over a single 'things' class plus the "
        "gt stuff classes with unmapped pixels ignored and classes without gt pixels left out (also as "
        "U2Seg's in-place relabel gives it: semantic_inplace), box AP only. For U2Seg's paper numbers "
        "point evaluate.gt_panoptic_json at a set made by `u2seg gt-supercategory`",
        lambda v: bool(v) and len(set(v)) == len(v), "a non-empty list of distinct protocols")
    report_images: int = knob(12, "images shown in eval/report.html", _non_negative, ">= 0")
    target: Literal["labels", "model"] = knob("labels", "evaluate the pseudo-labels or the trained "
                                              "model's predictions")


@dataclass
class FinetuneConfig:
    """Few-shot fine-tuning on a labeled set (``u2seg finetune``): the paper's label-efficiency experiment.

    A seeded fraction of the labeled training set becomes a label set with the real categories; the model
    trains on it from the self-trained u2seg model (its class layers re-initialised) or from the backbone
    alone, and is scored on the held-out set (``evaluate.images``, ``evaluate.gt_panoptic_json``) with the
    real categories, no cluster matching. The rest of the recipe (optimizer, clipping, heads, AMP, workers)
    is ``train.*``'s.
    """

    init: Literal["u2seg", "backbone"] = knob(
        "u2seg", "where the fine-tuned model starts: u2seg = the run root's final self-trained model (backbone, "
        "FPN, RPN, box and mask trunks, semantic trunk kept; box classifier, mask predictor and semantic head's "
        "last conv re-initialised for the real categories); backbone = train.backbone with train.weights only")
    fraction: float = knob(0.01, "fraction of the labeled training set's images to fine-tune on (the paper: 1%, "
                           "2%, 5%, 10%), a seeded subset that grows with the fraction (a smaller one is part of "
                           "a larger one)", lambda v: 0.0 < v <= 1.0, "a fraction in (0, 1]")
    gt_panoptic_json: str | None = knob(None, "COCO panoptic JSON of the labeled training set (path/URI), e.g. "
                                        "panoptic_train2017.json; its categories are the model's")
    gt_panoptic_dir: str | None = knob(None, "folder of its panoptic PNGs (path/URI); default: the JSON's name "
                                       "without .json")
    images_dir: str | None = knob(None, "folder or s3:// prefix of its images, named by the JSON's file_name "
                                  "(e.g. train2017/); None = each image entry's 'uri' (the synthetic world's)")
    steps: int = knob(1000, "optimizer steps of the fine-tuning", _positive, "a positive integer")
    lr: float | None = knob(None, "base learning rate of the fine-tuning; None = train.lr",
                            lambda v: v is None or v > 0, "None or > 0")
    batch_size: int | None = knob(None, "images per worker per step; None = train.batch_size",
                                  lambda v: v is None or v > 0, "None or a positive integer")
    warmup_steps: int = knob(0, "linear warmup steps of the fine-tuning (from train.warmup_factor x lr)",
                             _non_negative, ">= 0")
    lr_steps: list[int] = knob([], "steps of the fine-tuning from which its lr is multiplied by train.lr_gamma "  # noqa: RUF009
                               "once more; each below finetune.steps", _ascending_steps,
                               "a strictly ascending list of positive integers")


@dataclass
class U2SegConfig:
    """The whole run."""

    run: RunConfig = field(default_factory=RunConfig)
    manifest: ManifestConfig = field(default_factory=ManifestConfig)
    stuff: StuffConfig = field(default_factory=StuffConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, *, redact: bool = True) -> str:
        """Resolved YAML; secrets are redacted unless asked not to (they never go to the run root)."""
        d = self.to_dict()
        if redact:
            for k in ("key", "secret"):
                if d["run"]["storage"].get(k):
                    d["run"]["storage"][k] = "<redacted>"
        return yaml.safe_dump(d, sort_keys=False)

    def hash(self) -> str:
        """Hash of the work the run describes (storage credentials and logging excluded)."""
        d = self.to_dict()
        d["run"] = {k: v for k, v in d["run"].items() if k not in ("storage", "log_level", "ray_address",
                                                                   "ray_num_cpus", "run_root", "lease_s",
                                                                   "progress_every_s")}
        d["train"] = {k: v for k, v in d["train"].items() if k != "mlflow_uri"}
        return _digest(d)

    def section_hash(self, sections: Iterable[str], exclude: Iterable[str] = ()) -> str:
        """Hash of the named config sections (or single dotted knobs) plus the seed: what a stage's work
        depends on. The run root's location is in no hash, so a moved run root resumes.

        The stage table (``u2seg.pipeline.stages``) names each stage's sections (its own and every
        upstream one), so a changed upstream knob invalidates downstream stages. ``exclude`` drops
        dotted keys that select work rather than describe it (``evaluate.target``).
        """
        return _digest(self.section_values(sections, exclude))

    def section_values(self, sections: Iterable[str], exclude: Iterable[str] = ()) -> dict[str, Any]:
        """The dotted knobs of ``sections`` (a section name, or one dotted knob) and their values; markers
        keep them, to say which knob changed."""
        d = self.to_dict()
        flat: dict[str, Any] = {"run.seed": self.run.seed}
        for entry in sections:
            section, _, key = entry.partition(".")
            if key:
                flat[entry] = d[section][key]
                continue
            for name, value in d[section].items():
                flat[f"{section}.{name}"] = value
        for dotted in exclude:
            flat.pop(dotted, None)
        return flat


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Coerce int->float where harmless and verify ``value`` matches the annotation ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if isinstance(value, bool) and {"yes", "no"} <= set(args):  # YAML reads yes/no as booleans
            value = "yes" if value else "no"
        if value not in args:
            raise ConfigError(key, value, "one of " + ", ".join(repr(a) for a in args))
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(key, value, " or ".join(_type_name(a) for a in args))
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, f"a list of {_type_name(args[0])}")
        return [_check_type(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, value, "a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, "true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "a string")
        return value
    return value


def _type_name(tp: Any) -> str:
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and invalid values."""
    if not isinstance(data, Mapping):
        raise ConfigError(prefix.rstrip("."), data, "a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        name = sorted(unknown)[0]
        raise ConfigError(prefix + name, data[name], f"a known key of {prefix.rstrip('.') or 'the config'}: "
                          + ", ".join(fields))
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = prefix + name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data.get(name) or {}, key + ".")
            continue
        if name not in data:
            continue
        value = _check_type(key, data[name], tp)
        check = f.metadata.get("check")
        if check is not None and value is not None and not check(value):
            raise ConfigError(key, value, f.metadata.get("allowed") or "a valid value")
        kwargs[name] = value
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(dotted, value, f"{p} is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``extract.tau=0.2`` -> ("extract.tau", 0.2); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(text, None, "an override of the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(text, raw, "an override of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def builtin_config_path(name: str) -> str:
    """Path of a config shipped in ``u2seg/configs`` (``demo``, ``coco``, ``imagenet``)."""
    return str(resources.files("u2seg") / "configs" / f"{name}.yaml")


_PATCH = re.compile(r"patch(\d+)")


def check_consistency(cfg: U2SegConfig) -> U2SegConfig:
    """Rules that involve more than one knob, checked when the config is loaded (not minutes later on a worker)."""
    m = _PATCH.search(cfg.extract.backbone)
    patch = int(m.group(1)) if m else 0
    sizes = [("extract.image_size", cfg.extract.image_size), ("extract.crop_size", cfg.extract.crop_size),
             ("stuff.crop_size", cfg.stuff.crop_size)]
    for key, size in sizes:
        if patch and size % patch:
            raise ConfigError(key, size, f"a multiple of the backbone's patch size {patch} (extract.backbone="
                              f"{cfg.extract.backbone}), e.g. {max(patch, size // patch * patch)}")
    late = [s for s in cfg.train.lr_steps if s >= cfg.train.steps]
    if late:
        raise ConfigError("train.lr_steps", cfg.train.lr_steps, f"steps below train.steps ({cfg.train.steps}); "
                          f"{late} would never decay the lr")
    late = [s for s in cfg.finetune.lr_steps if s >= cfg.finetune.steps]
    if late:
        raise ConfigError("finetune.lr_steps", cfg.finetune.lr_steps, f"steps below finetune.steps "
                          f"({cfg.finetune.steps}); {late} would never decay the lr")
    return cfg


def load_config(path: str | None = None, overrides: Iterable[str] = ()) -> U2SegConfig:
    """Load YAML (a path, or the name of a built-in config) and apply dotted overrides, validating all."""
    tree: dict[str, Any] = {}
    if path:
        if not os.path.exists(path) and os.path.exists(builtin_config_path(path)):
            path = builtin_config_path(path)
        try:
            with open(path) as fh:
                tree = yaml.safe_load(fh) or {}
        except FileNotFoundError as exc:
            raise ConfigError("--config", path, "an existing YAML file or a built-in name "
                              "(demo, coco, imagenet)") from exc
        except yaml.YAMLError as exc:
            raise ConfigError("--config", path, f"valid YAML ({exc})") from exc
        if not isinstance(tree, dict):
            raise ConfigError("--config", path, "a YAML mapping at the top level")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return check_consistency(_build(U2SegConfig, tree, ""))


def config_from_dict(tree: Mapping[str, Any]) -> U2SegConfig:
    """Validate a plain dict (e.g. a resolved config read back from a run root)."""
    return check_consistency(_build(U2SegConfig, tree, ""))


def explain() -> str:
    """Every knob with its default and documentation (``u2seg config --explain``)."""
    lines: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            lines.append(f"{prefix}{f.name} = {default!r}\n    {f.metadata.get('doc', '')}")

    walk(U2SegConfig, "")
    return "\n".join(lines)


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; 'cuda' without a GPU is a config error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device", device, "'cpu' or 'auto' on a machine without a CUDA GPU")
    return device
