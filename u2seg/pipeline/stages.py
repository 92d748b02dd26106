"""The stage table: every stage declared once — what it writes, what its config hash covers, whether it
needs Ray, and the function that runs it. The runner, the pipeline, the CLI and viz all read this table.

Importing it is cheap (no torch, no Ray): stage functions are imported when a stage runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from u2seg.io import layout

if TYPE_CHECKING:
    from u2seg.config import U2SegConfig
    from u2seg.io import RunRoot

# Config keys that do not describe what a stage makes (which work to run, where training scalars also go,
# which optional copies to write): never part of a stage hash.
SELECTOR_KEYS = ("evaluate.target", "train.mlflow_uri", "label.coco_max_images")


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    folder: the stage's own run-root folder; its markers (_STARTED, stats.json, _SUCCESS) live there.
    outputs: every run-root path (folder or file) the stage owns.
    sections: the config sections its hash covers (its own and every upstream section).
    upstream: the stages whose outputs it reads; its marker records their output fingerprints, and it is
        stale when one of them changes.
    replace: "reset" — outputs made with another config (or, unless ``incremental``, from other upstream
        outputs) are removed before the stage runs; with the same ones it resumes from its own partial
        outputs. "when_done" — the stage replaces its outputs itself, and only once the new ones are
        complete, so a failed rerun leaves the previous results intact.
    incremental: an upstream change does not reset the stage: it reconciles its outputs with its inputs
        itself (extract processes exactly the new images and drops departed ones; label relabels exactly
        the groups whose inputs changed).
    keep_across: config keys whose change does not reset a "reset" stage's outputs: the stage itself
        keeps what is still valid (train keeps finished rounds when only train.rounds changes).
    """

    name: str
    folder: str
    outputs: tuple[str, ...]
    sections: tuple[str, ...]
    upstream: tuple[str, ...]
    function: str  # "module:function", called as function(cfg, root) -> stats
    needs_ray: bool
    replace: Literal["reset", "when_done"]
    summary: str
    incremental: bool = False
    keep_across: tuple[str, ...] = ()

    def config_hash(self, cfg: U2SegConfig) -> str:
        return cfg.section_hash(self.sections, exclude=SELECTOR_KEYS)

    def config_values(self, cfg: U2SegConfig) -> dict[str, Any]:
        return cfg.section_values(self.sections, exclude=SELECTOR_KEYS)

    def reset_hash(self, cfg: U2SegConfig) -> str:
        """The hash whose change removes the stage's outputs before it runs (see ``keep_across``)."""
        return cfg.section_hash(self.sections, exclude=(*SELECTOR_KEYS, *self.keep_across))

    def run_function(self) -> Callable[[U2SegConfig, RunRoot], dict[str, Any]]:
        module, name = self.function.split(":")
        return getattr(importlib.import_module(module), name)

    def marker(self, name: str = layout.SUCCESS) -> str:
        return layout.marker(self.folder, name)


_UP_TO_LABEL = ("manifest", "stuff", "extract", "cluster", "label")
# The stuff head reads the backbone's tokens: these extract knobs decide what it is trained on.
_STUFF_SECTIONS = ("manifest", "stuff", "extract.backbone", "extract.weights")

STAGES: tuple[Stage, ...] = (
    Stage("manifest", layout.MANIFEST, (layout.MANIFEST,), ("manifest",), (),
          "u2seg.pipeline.manifest:run_manifest", False, "reset",
          "list every input image into manifest/*.parquet (relisted on every run: manifest.refresh)"),
    Stage("stuff", layout.STUFF, (layout.STUFF,), _STUFF_SECTIONS, ("manifest",),
          "u2seg.pipeline.stuff:run_stuff", True, "reset",
          "train STEGO's stuff head and cluster probe on frozen backbone features (Ray Train), or load one",
          incremental=True),
    Stage("extract", "extract", ("extract",), ("manifest", "stuff", "extract"), ("manifest", "stuff"),
          "u2seg.pipeline.extract:run_extract", True, "reset",
          "backbone features, MaskCut masks, thing descriptors and stuff classes per image (Ray Data actors)",
          incremental=True),
    Stage("cluster", "cluster", ("cluster",), ("manifest", "stuff", "extract", "cluster"), ("extract",),
          "u2seg.pipeline.cluster:run_cluster", True, "reset",
          "k-means of mask descriptors (things) and patch features (stuff); every mask's class",
          incremental=True),
    Stage("label", layout.LABELS, (layout.LABELS,), _UP_TO_LABEL, ("extract", "cluster"),
          "u2seg.pipeline.label:run_label", True, "reset",
          "panoptic, instance and semantic pseudo-labels (COCO / COCO panoptic)", incremental=True),
    Stage("train", layout.TRAIN, (layout.TRAIN, layout.SELFTRAIN), (*_UP_TO_LABEL, "train"), ("label",),
          "u2seg.pipeline.train:run_train", True, "reset",
          "train the model on the pseudo-labels, then train.rounds self-training rounds (Ray Train)",
          keep_across=("train.rounds",)),
    Stage("predict", layout.PREDICT, (layout.PREDICT,), (*_UP_TO_LABEL, "train", "predict", "evaluate.images"),
          ("train", "extract"),
          "u2seg.pipeline.predict:run_predict", True, "reset",
          "the trained model's predictions on the held-out images (evaluate.images) or the training images"),
    Stage("evaluate", layout.EVAL_LABELS, (layout.EVAL_LABELS,), (*_UP_TO_LABEL, "evaluate"), ("label",),
          "u2seg.pipeline.evaluate:run_evaluate_labels", False, "when_done",
          "score the pseudo-labels against a labeled set into eval/labels/"),
    Stage("evaluate_model", layout.EVAL_MODEL, (layout.EVAL_MODEL,),
          (*_UP_TO_LABEL, "train", "predict", "evaluate"),
          ("predict",), "u2seg.pipeline.evaluate:run_evaluate_model", False, "when_done",
          "score the trained model's predictions against a labeled set into eval/model/"),
)

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
PIPELINE: tuple[str, ...] = tuple(s.name for s in STAGES)
EVALUATION_STAGES = ("evaluate", "evaluate_model")
MODEL_STAGES = ("train", "predict", "evaluate_model")


def finetune_stage(folder: str) -> Stage:
    """The fine-tuning run in ``folder`` (``finetune/<init>-<fraction>``, ``layout.finetune_dir``) as a stage of
    its own: each (init, fraction) has its markers, its hash and its outputs, so runs of several fractions sit
    side by side in one run root. ``init=u2seg`` reads the train stage's final model (and so its whole upstream
    config); ``init=backbone`` reads nothing of the run root."""
    init = layout.finetune_init(folder)
    own = ("train", "predict", "evaluate", "finetune")
    return Stage(folder, folder, (folder,), (*_UP_TO_LABEL, *own) if init == "u2seg" else own,
                 ("train",) if init == "u2seg" else (), "u2seg.pipeline.finetune:run_finetune", True, "reset",
                 "fine-tune on a labeled fraction of a labeled set, predict and score the held-out set")


def stage(name: str) -> Stage:
    if name.startswith(layout.FINETUNE + "/"):
        return finetune_stage(name)
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(PIPELINE)}") from None
