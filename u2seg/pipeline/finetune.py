"""Few-shot fine-tuning on a labeled set (``u2seg finetune``): the paper's label-efficiency experiment.

U2Seg reports that its self-trained model is a better start than the backbone alone when only 1-10% of
COCO's labels are available. One run, in ``finetune/<init>-<fraction>/`` (``layout.finetune_dir``), a stage of
its own (``stages.finetune_stage``: own markers and hash, so several runs sit side by side):

1. ``finetune.fraction`` of the labeled training set's images (``finetune.gt_panoptic_json``), a seeded
   subset ranked by a hash of (seed, file name), so a smaller fraction's images are part of a larger one's,
   become a label set (``labels/``, the Parquet-part format the train stage reads) whose categories are the
   real ones in the model's order: things by gt id, then stuff (``categories.json`` keeps the model -> gt
   id map, ``subset.json`` the chosen images);
2. the existing Ray Train loop trains on it (``train/``) from the run root's final self-trained model with its
   class layers re-initialised (``finetune.init=u2seg``; ``u2seg.model.transfer_weights``) or from
   ``train.backbone`` / ``train.weights`` alone (``backbone``), with ``finetune.steps`` / ``lr`` / ``batch_size``
   / ``warmup_steps`` / ``lr_steps`` and ``train.*`` for the rest of the recipe; supervised, so no DropLoss;
3. the existing predict actors predict the held-out images (``evaluate.images``) into ``predict/``;
4. the existing evaluation scores them against ``evaluate.gt_panoptic_json`` (and ``gt_instances_json`` for
   AP) with the fixed model -> gt id map, no cluster matching (protocol ``identity``), into ``eval/``.

Every step resumes: the label set keeps its committed groups, training its checkpoints, predict its ledger.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from u2seg.config import ConfigError, U2SegConfig, config_from_dict
from u2seg.errors import UpstreamError
from u2seg.evaluate.loading import PanopticDir, join_uri
from u2seg.io import RunRoot, layout
from u2seg.io.images import image_id_for
from u2seg.io.inputs import read_json_input
from u2seg.io.labelset import Fragment, LabelSet

log = logging.getLogger(__name__)

GT_GROUP_IMAGES = 64  # labeled images per committed group of the fine-tuning label set
IO_THREADS = 8  # groups converted concurrently (PNG reads and writes: storage latency is the limit)


def finetune_folder(cfg: U2SegConfig) -> str:
    """The run folder (and stage name) ``cfg.finetune`` describes: ``finetune/<init>-<fraction>``."""
    return layout.finetune_dir(cfg.finetune.init, cfg.finetune.fraction)


def select_fraction(names: Sequence[str], fraction: float, seed: int) -> list[str]:
    """The seeded subset of ``names`` a fraction selects, in rank order: every name ranked by a hash of
    (seed, name), the first ``floor(fraction x N)`` kept. The rank does not depend on the fraction, so a
    smaller fraction's subset is the start of a larger one's (nested), and the same names, fraction and seed
    give the same subset on any machine, in any listing order."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError("finetune.fraction", fraction, "a fraction in (0, 1]")
    unique = sorted(set(names))
    n = math.floor(fraction * len(unique) + 1e-9)  # 0.29 x 100 is 28.999... in floating point
    if n == 0:
        least = f" (>= {1 / len(unique):.3g})" if unique else ""
        raise ConfigError("finetune.fraction", fraction, f"a fraction that selects at least one of the "
                          f"{len(unique)} labeled images{least}")
    return sorted(unique, key=lambda s: (hashlib.sha1(f"{seed}\0{s}".encode()).digest(), s))[:n]


def model_categories(categories: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], dict[int, int], int]:
    """The labeled set's categories in the model's order (things by id, then stuff by id: u2seg's category
    convention, things 1..K_things), the model id -> gt id map, and the number of things."""
    if any("isthing" not in c for c in categories):
        raise ValueError("every category of finetune.gt_panoptic_json needs 'isthing' (things and stuff train "
                         "different heads)")
    things = sorted((dict(c) for c in categories if int(c["isthing"])), key=lambda c: int(c["id"]))
    stuff = sorted((dict(c) for c in categories if not int(c["isthing"])), key=lambda c: int(c["id"]))
    if not things:
        raise ValueError("finetune.gt_panoptic_json has no thing category: the detector needs at least one")
    ordered = things + stuff
    return ordered, {i + 1: int(c["id"]) for i, c in enumerate(ordered)}, len(things)


def finetune_train_config(cfg: U2SegConfig) -> U2SegConfig:
    """``cfg`` with ``train.*`` set to the fine-tuning's recipe: ``finetune.steps`` / ``lr`` / ``batch_size`` /
    ``warmup_steps`` / ``lr_steps``, no self-training round, no DropLoss (the boxes are real labels, not
    pseudo ones whose misses should not be punished)."""
    ft = cfg.finetune
    d = cfg.to_dict()
    d["train"].update(steps=ft.steps, lr=ft.lr or cfg.train.lr, batch_size=ft.batch_size or cfg.train.batch_size,
                      warmup_steps=ft.warmup_steps, lr_steps=list(ft.lr_steps), rounds=0, drop_loss_iou=0.0)
    return config_from_dict(d)


def _image_uri(image: Mapping[str, Any], images_dir: str | None) -> str:
    if images_dir:
        return join_uri(images_dir, str(image["file_name"]))
    if not image.get("uri"):
        raise ConfigError("finetune.images_dir", images_dir, f"the folder of the labeled images (image "
                          f"{image.get('file_name')!r} of finetune.gt_panoptic_json has no 'uri')")
    return str(image["uri"])


def write_labeled_subset(cfg: U2SegConfig, root: RunRoot, folder: str) -> dict[str, Any]:
    """Step 1: the selected labeled images as the run's label set (real categories in the model's order);
    groups already committed (a resumed run) are kept. Returns counts, the classes and the id map."""
    from u2seg.pipeline.evaluate import panoptic_locations

    ft, storage, retry_s = cfg.finetune, cfg.run.storage.storage_options(), cfg.run.storage.retry_s
    json_uri, png_dir = panoptic_locations(ft.gt_panoptic_json, ft.gt_panoptic_dir, storage, "finetune",
                                           "fine-tune on")
    gt = read_json_input(json_uri, storage, retry_s)
    ordered, model_to_gt, k_things = model_categories(gt["categories"])
    to_model = {g: m for m, g in model_to_gt.items()}
    anns = {int(a["image_id"]): a for a in gt.get("annotations", [])}
    by_name = {str(im["file_name"]): im for im in gt["images"] if int(im["id"]) in anns}
    chosen = select_fraction(list(by_name), ft.fraction, cfg.run.seed)
    log.info("finetune: %d of %d labeled images (fraction %g, seed %d) from %s", len(chosen), len(by_name),
             ft.fraction, cfg.run.seed, json_uri)
    labels = LabelSet(root, layout.finetune_labels(folder), k_things, len(ordered) - k_things)
    gt_dir = PanopticDir(png_dir, storage, retry_s)
    groups = [chosen[i:i + GT_GROUP_IMAGES] for i in range(0, len(chosen), GT_GROUP_IMAGES)]
    done = set(labels.groups())

    def convert(names: list[str]) -> int:
        images = [by_name[n] for n in names]
        uris = [_image_uri(im, ft.images_dir) for im in images]
        ids = [image_id_for(u) for u in uris]
        group = layout.group_stem(layout.group_name(ids))
        if group in done:
            return 0
        fragment = Fragment()
        for im, uri, image_id in zip(images, uris, ids, strict=True):
            ann = anns[int(im["id"])]
            segments = []
            for s in ann["segments_info"]:
                if int(s["category_id"]) not in to_model:
                    raise ValueError(f"image {im['file_name']}: segment {s['id']} has category {s['category_id']}, "
                                     f"not one of {json_uri}'s categories")
                segments.append({**s, "category_id": to_model[int(s["category_id"])]})
            seg_ids = gt_dir.read_ids(ann["file_name"])
            fragment.add(labels.write_image(group, image_id, uri, seg_ids, segments))
        labels.commit(group, fragment)
        return len(images)

    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
        written = sum(pool.map(convert, groups))
    root.write_json(layout.finetune_categories(folder), {
        "categories": ordered, "model_to_gt": {str(m): g for m, g in model_to_gt.items()},
        "k_things": k_things, "k_stuff": len(ordered) - k_things, "source": json_uri})
    root.write_json(layout.finetune_subset(folder), {
        "fraction": ft.fraction, "seed": cfg.run.seed, "selected": len(chosen), "labeled_images": len(by_name),
        "file_names": chosen})
    size = labels.finish(f"u2seg fine-tuning labels: {len(chosen)} images of {json_uri}", cfg.label.coco_max_images)
    return {"labeled_images": len(by_name), "selected": len(chosen), "written_now": written,
            "instances": size["instances"], "k_things": k_things, "k_stuff": len(ordered) - k_things,
            "model_to_gt": model_to_gt}


def _init_model(cfg: U2SegConfig, root: RunRoot) -> str | None:
    """The model fine-tuning starts from (``init=u2seg``: the latest finished training round), or None."""
    if cfg.finetune.init != "u2seg":
        return None
    r = layout.latest_round(root)
    if r < 0:
        raise UpstreamError(f"finetune.init=u2seg starts from the self-trained model, and {root.join(layout.TRAIN)} "
                            "holds none: run `u2seg train` (or `u2seg selftrain`, or `u2seg pipeline`) first, or "
                            "set finetune.init=backbone")
    return layout.round_model(r)


def check_finetune_config(cfg: U2SegConfig) -> None:
    """Knobs fine-tuning needs that have no default: what to train on and where to score."""
    if not cfg.finetune.gt_panoptic_json:
        raise ConfigError("finetune.gt_panoptic_json", None, "the COCO panoptic JSON of the labeled training set "
                          "(e.g. panoptic_train2017.json) whose fraction is fine-tuned on")
    if not cfg.evaluate.images:
        raise ConfigError("evaluate.images", cfg.evaluate.images, "the held-out labeled images the fine-tuned "
                          "model is scored on (e.g. COCO val2017), with evaluate.gt_panoptic_json")
    if not cfg.evaluate.gt_panoptic_json:
        raise ConfigError("evaluate.gt_panoptic_json", None, "the COCO panoptic JSON of the held-out set "
                          "(evaluate.images) the fine-tuned model is scored on")


def run_finetune(cfg: U2SegConfig, root: RunRoot) -> dict[str, Any]:
    """The fine-tuning stage (module doc): labeled subset, training, held-out predictions, identity-mapped
    scores; returns the stage's stats (the evaluation's flat numbers, the counts and timings)."""
    from u2seg.pipeline.evaluate import evaluate_label_set
    from u2seg.pipeline.predict import list_held_out, predict_images
    from u2seg.pipeline.train import fit_model

    check_finetune_config(cfg)
    folder = finetune_folder(cfg)
    init_rel = _init_model(cfg, root)
    subset = write_labeled_subset(cfg, root, folder)
    classes = (subset["k_things"], subset["k_stuff"])
    tcfg = finetune_train_config(cfg)
    log.info("finetune %s: %d images, %d steps from %s", folder, subset["selected"], tcfg.train.steps,
             root.join(init_rel) if init_rel else f"{tcfg.train.backbone} (train.weights={tcfg.train.weights})")
    trained = fit_model(tcfg, root, name=layout.TRAIN, storage_dir=folder, label_dir=layout.finetune_labels(folder),
                        k_things=classes[0], k_stuff=classes[1], init_model_rel=init_rel,
                        init_transfer=init_rel is not None, stage=folder)
    out, inputs = layout.finetune_predict(folder), layout.finetune_predict_inputs(folder)
    list_held_out(cfg, root, out, inputs)
    predicted = predict_images(tcfg, root, 0, out, inputs, stage=folder, model_rel=layout.finetune_model(folder),
                               classes=classes)
    scores = evaluate_label_set(cfg, root, LabelSet(root, out), layout.finetune_eval(folder),
                                identity=subset["model_to_gt"])
    return {**scores, "init": cfg.finetune.init, "fraction": cfg.finetune.fraction,
            "init_model": init_rel, "labeled_images": subset["labeled_images"], "train_images": subset["selected"],
            "train": {k: v for k, v in trained.items() if k != "label_dir"},
            "predict": {k: predicted[k] for k in ("images", "errors", "instances")},
            "model_to_gt": json.loads(json.dumps(subset["model_to_gt"]))}
