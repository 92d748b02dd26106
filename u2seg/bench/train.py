"""Train-stage throughput: the same training run with 1 and with 2 Ray Train workers (DDP), in one process.

A tiny labelled run root is built on local disk (synthetic world through manifest -> extract -> cluster
-> label with tiny settings), then ``run_train_round`` trains ``steps`` steps twice. Rates are taken from
the per-step ``elapsed_s`` the workers record (first step excluded when there is more than one: it holds
the Ray Data start-up and the first-iteration allocations), so worker-group start-up is reported apart.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from u2seg.config import U2SegConfig, load_config
from u2seg.io import RunRoot, layout

log = logging.getLogger(__name__)

# Stage settings that label a handful of images in seconds on a CPU (the quality of the labels is not
# what this benchmark measures; the model trains on whatever they are).
TINY_STAGES = [
    "extract.backbone=vit_small_patch8_224.dino", "extract.image_size=64", "extract.n_masks=2",
    "extract.batch_size=4", "extract.rows_per_part=4", "extract.stuff_grid=8", "extract.stuff_dim=16",
    "extract.patches_per_image=16", "extract.amp=none", "stuff.method=kmeans", "extract.descriptor=mask_pool",
    "cluster.things_k=4", "cluster.stuff_k=3",
    "cluster.niter=5", "cluster.num_shards=2", "run.max_error_fraction=0.9",
]


def labelled_run_root(tmp: str, n_images: int, seed: int = 0) -> tuple[U2SegConfig, RunRoot]:
    """A local run root whose manifest/extract/cluster/label stages are done on ``n_images`` images."""
    from u2seg.data.synthetic import make_synthetic
    from u2seg.pipeline.run_stage import open_root, run_stage

    world = Path(tmp, "world")
    make_synthetic(str(world), n_images, seed=seed, min_size=160, max_size=256)
    cfg = load_config(None, [f"run.run_root={Path(tmp, 'run')}", f"manifest.inputs=[{world / 'images'}]",
                             *TINY_STAGES])
    for stage in ("manifest", "stuff", "extract", "cluster", "label"):
        run_stage(stage, cfg)
    return cfg, open_root(cfg)


def step_rates(history: list[dict[str, Any]], batch_size: int, workers: int) -> dict[str, Any]:
    """Samples/s and CPU s/sample from rank 0's per-step records (``elapsed_s``, ``cpu_s`` of train.py)."""
    rows = sorted((h for h in history if h.get("rank", 0) == 0), key=lambda h: h["step"])
    if not rows:
        raise ValueError("no per-step records of rank 0 in metrics.jsonl")
    first, last = rows[0], rows[-1]
    if len(rows) > 1:  # steady state: from the end of step 1 to the end of the last step
        steps, seconds = last["step"] - first["step"], last["elapsed_s"] - first["elapsed_s"]
        cpu = last["cpu_s"] - first["cpu_s"]
    else:
        steps, seconds, cpu = 1, first["elapsed_s"], first["cpu_s"]
    total = steps * batch_size * workers / seconds if seconds > 0 else 0.0
    return {"timed_steps": steps, "timed_s": round(seconds, 3), "first_step_s": round(first["elapsed_s"], 3),
            "samples_per_s_total": round(total, 4), "samples_per_s_per_worker": round(total / workers, 4),
            # CPU seconds rank 0 spent per sample it trained: the work's cost, whatever else the machine runs
            "rank0_cpu_s_per_sample": round(cpu / (steps * batch_size), 4)}


def train_once(cfg: U2SegConfig, root: RunRoot, workers: int, steps: int, image_size: int, backbone: str,
               batch_size: int) -> dict[str, Any]:
    from u2seg.config import config_from_dict
    from u2seg.pipeline.train import run_train_round

    root.remove("train", recursive=True)  # each measurement trains from scratch, not from the last one
    d = cfg.to_dict()
    d["train"].update(num_workers=workers, steps=steps, checkpoint_every=steps, image_size=image_size,
                      backbone=backbone, batch_size=batch_size, rounds=0, use_gpu="no", max_failures=0)
    tcfg = config_from_dict(d)
    t0 = time.time()
    stats = run_train_round(tcfg, root, 0)
    wall = time.time() - t0
    lines = root.read_text(layout.round_metrics(0)).splitlines()
    history = [json.loads(line) for line in lines if line]
    out = {"workers": workers, "steps": stats["steps"], "fit_wall_s": round(wall, 2),
           "loss_total": stats["loss_total"], **step_rates(history, batch_size, workers)}
    log.info("bench train: %s", out)
    return out


def bench_train(steps: int, image_size: int, backbone: str, *, n_images: int = 8, batch_size: int = 1,
                seed: int = 0) -> dict[str, Any]:
    """1 worker vs 2 workers on the CPU; the ratio is the data-parallel speed-up of the same work per step."""
    import ray

    from u2seg.pipeline.ray_session import quiet_ray_data

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4, logging_level=logging.WARNING, log_to_driver=False)
    quiet_ray_data()
    try:
        with tempfile.TemporaryDirectory(prefix="u2seg-bench-train-") as tmp:
            t0 = time.time()
            cfg, root = labelled_run_root(tmp, n_images, seed)
            prep = time.time() - t0
            runs = [train_once(cfg, root, w, steps, image_size, backbone, batch_size) for w in (1, 2)]
    finally:
        if started:
            ray.shutdown()
    one, two = runs
    ratio = two["samples_per_s_total"] / one["samples_per_s_total"] if one["samples_per_s_total"] else 0.0
    cpu_one = one["rank0_cpu_s_per_sample"]
    cpu_ratio = two["rank0_cpu_s_per_sample"] / cpu_one if cpu_one else 0.0
    return {
        "config": {"steps": steps, "image_size": image_size, "backbone": backbone, "n_images": n_images,
                   "batch_size_per_worker": batch_size, "device": "cpu", "torch_threads_per_worker": 1,
                   "weights": "none", "seed": seed},
        "prepare_run_root_s": round(prep, 2),
        "workers_1": one,
        "workers_2": two,
        "throughput_ratio_2_vs_1": round(ratio, 3),
        "scaling_efficiency": round(ratio / 2, 3),
        "cpu_per_sample_ratio_2_vs_1": round(cpu_ratio, 3),  # > 1: DDP overhead (allreduce, gloo threads)
    }
