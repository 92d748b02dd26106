"""Label efficiency on the synthetic world: fine-tuning from the self-trained u2seg model vs from the backbone.

The paper's claim in small: with few labels, the unsupervised model is a better start. World A (``u2seg
synth``, seed 0) goes through the tiny pipeline (``bench.train.labelled_run_root``: manifest -> extract ->
cluster -> label) and the train stage (self-training on its pseudo-labels); then ``fraction`` of world A's
ground truth fine-tunes two models for the same steps, one from that model (``finetune.init=u2seg``), one from
the backbone alone (``backbone``), and both are scored on world B (seed 1, held out) with the real categories:
PQ and AP side by side. Everything runs on the CPU with a randomly initialised backbone (no weights are
downloaded), so the numbers say what self-training on pseudo-labels adds to a from-scratch start.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from u2seg.config import U2SegConfig, config_from_dict

log = logging.getLogger(__name__)

SCORES = ("pq", "sq", "rq", "pq_things", "pq_stuff", "miou", "ap_segm", "ap_bbox", "ap_agnostic_segm")


def _with(cfg: U2SegConfig, **sections: dict[str, Any]) -> U2SegConfig:
    d = cfg.to_dict()
    for name, values in sections.items():
        d[name].update(values)
    return config_from_dict(d)


def bench_finetune(*, n_train: int = 40, n_held_out: int = 6, fraction: float = 0.05, selftrain_steps: int = 20,
                   finetune_steps: int = 20, image_size: int = 128, backbone: str = "resnet18",
                   seed: int = 0) -> dict[str, Any]:
    """Train u2seg on world A, fine-tune on ``fraction`` of its ground truth from it and from the backbone for
    ``finetune_steps`` each, score both on world B (module doc). Returns the config, both runs' held-out
    scores and timings, and their differences (u2seg minus backbone)."""
    import ray

    from u2seg.bench.train import labelled_run_root
    from u2seg.data.synthetic import make_synthetic
    from u2seg.pipeline.finetune import finetune_folder
    from u2seg.pipeline.ray_session import quiet_ray_data, start_local_ray
    from u2seg.pipeline.run_stage import run_stage

    started = not ray.is_initialized()
    if started:
        start_local_ray(attempts=8, num_cpus=4, logging_level=logging.WARNING, log_to_driver=False)  # a slow start
    quiet_ray_data()
    recipe = {"backbone": backbone, "image_size": image_size, "batch_size": 2, "num_workers": 1, "use_gpu": "no",
              "rounds": 0, "max_failures": 0, "checkpoint_every": max(selftrain_steps, finetune_steps)}
    try:
        with tempfile.TemporaryDirectory(prefix="u2seg-bench-finetune-") as tmp:
            t0 = time.time()
            cfg, _ = labelled_run_root(tmp, n_train, seed)
            world_a, world_b = Path(tmp, "world"), Path(tmp, "world-b")
            make_synthetic(str(world_b), n_held_out, seed=1, min_size=160, max_size=256, prefix="val_")
            cfg = _with(cfg, train={**recipe, "steps": selftrain_steps},
                        evaluate={"images": [str(world_b / "images")],
                                  "gt_panoptic_json": str(world_b / "gt" / "panoptic.json"),
                                  "gt_instances_json": str(world_b / "gt" / "instances.json"), "report_images": 0})
            prep = time.time() - t0
            t1 = time.time()
            selftrain = run_stage("train", cfg)
            selftrain_s = time.time() - t1
            runs: dict[str, Any] = {}
            for init in ("u2seg", "backbone"):
                fcfg = _with(cfg, finetune={"init": init, "fraction": fraction, "steps": finetune_steps,
                                            "gt_panoptic_json": str(world_a / "gt" / "panoptic.json")})
                t2 = time.time()
                stats = run_stage(finetune_folder(fcfg), fcfg)
                runs[init] = {**{k: stats.get(k) for k in SCORES}, "train_images": stats["train_images"],
                              "labeled_images": stats["labeled_images"], "held_out_images": stats["images"],
                              "steps": stats["train"]["steps"], "loss_total": stats["train"]["loss_total"],
                              "wall_s": round(time.time() - t2, 1)}
                log.info("bench finetune %s: %s", init, runs[init])
    finally:
        if started:
            ray.shutdown()
    diff = {k: round(runs["u2seg"][k] - runs["backbone"][k], 4) for k in SCORES
            if isinstance(runs["u2seg"].get(k), float) and isinstance(runs["backbone"].get(k), float)}
    return {
        "config": {"world_a_images": n_train, "world_b_images": n_held_out, "fraction": fraction,
                   "selftrain_steps": selftrain_steps, "finetune_steps": finetune_steps, "image_size": image_size,
                   "backbone": backbone, "weights": "none (seeded random init)", "batch_size": 2, "device": "cpu",
                   "seed": seed, "held_out_seed": 1},
        "prepare_run_root_s": round(prep, 1),
        "selftrain": {"steps": selftrain.get("steps"), "loss_total": selftrain.get("loss_total"),
                      "wall_s": round(selftrain_s, 1)},
        "init_u2seg": runs["u2seg"],
        "init_backbone": runs["backbone"],
        "u2seg_minus_backbone": diff,
    }
