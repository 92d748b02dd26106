"""Train stage on the 2-node Ray cluster, run root on S3: a killed worker resumes, and so does a rerun.

One tiny run (6 synthetic images on S3 through manifest/extract/cluster/label) trains 6 steps with 2 DDP
workers and a checkpoint every 2 steps. As soon as the first checkpoint is registered in S3, one Ray Train
worker process is SIGKILLed (a crash, not a polite ``ray.kill``); the round must still end at step 6, and
the steps it records must start after a checkpoint (resumed), not at 1 (restarted). A second
``run_train_round`` of the same round must resume at step 6 and train nothing. Then predict writes
``predict/round-0`` in the label format, which must load in pycocotools and pass the panoptic rules.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

import numpy as np
import pytest

from u2seg.io import RunRoot
from u2seg.pipeline.runner import run_stage

pytestmark = pytest.mark.integration

STEPS, EVERY = 6, 2
TRAIN_KNOBS = [f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}", "train.num_workers=2",
               "train.batch_size=1", "train.image_size=96", "train.rounds=0", "train.max_failures=3"]
WORKER_CLASS = "RayTrainWorker"  # Ray Train V2's per-rank actor (ray/train/v2/.../worker_group/worker.py)


class Background:
    """Run a call in a thread, keeping its result or exception for the test thread."""

    def __init__(self, fn: Any, *args: Any):
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True)
        self._thread.start()

    def _run(self, fn: Any, *args: Any) -> None:
        try:
            self.result = fn(*args)
        except BaseException as exc:  # handed to the test thread
            self.error = exc

    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"training did not finish within {timeout}s"
        if self.error is not None:
            raise self.error
        return self.result


def registered_checkpoint_step(fs, prefix: str) -> int | None:
    """Step of the latest checkpoint Ray Train has registered under ``prefix`` (its snapshot names it)."""
    fs.invalidate_cache(prefix)
    try:
        names = {os.path.basename(p.rstrip("/")) for p in fs.ls(prefix, detail=False)}
    except FileNotFoundError:
        return None
    if "checkpoint_manager_snapshot.json" not in names:
        return None
    snap = json.loads(fs.cat_file(f"{prefix}/checkpoint_manager_snapshot.json"))
    latest = snap.get("latest_checkpoint_result")
    if not latest or latest["checkpoint_dir_name"] not in names:
        return None
    files = fs.ls(f"{prefix}/{latest['checkpoint_dir_name']}", detail=False)
    assert any(f.endswith("/model.pt") for f in files), f"checkpoint without model.pt: {files}"
    return int(latest["metrics"]["step"])


def train_worker_pids() -> list[int]:
    """Live Ray Train worker processes, from the GCS actor table (the test cluster runs no dashboard,
    which ``ray.util.state.list_actors`` would need)."""
    from ray._private import state

    return sorted(int(a["Pid"]) for a in state.actors().values()
                  if WORKER_CLASS in a["ActorClassName"] and a["State"] == "ALIVE" and a["Pid"])


@pytest.fixture
def labelled_s3_run(ray_cluster, s3, synthetic_world):
    """6 synthetic images on S3 and a run root on S3 whose label stage is done."""
    import s3fs
    from helpers import tiny_config

    t0 = time.time()
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3.storage_options())
    data = f"{s3.bucket}/train-world-{time.time_ns()}"
    for name in sorted(p.name for p in (synthetic_world / "images").iterdir())[:6]:
        fs.pipe_file(f"{data}/images/{name}", (synthetic_world / "images" / name).read_bytes())
    root_uri = s3.uri(f"train-run-{time.time_ns()}")
    cfg = tiny_config(root_uri, [f"s3://{data}/images"], s3, *TRAIN_KNOBS)
    for stage in ("manifest", "extract", "cluster", "label"):
        run_stage(stage, cfg)
    return cfg, RunRoot(root_uri, cfg.run.storage.storage_options()), fs, time.time() - t0


def metric_steps(root: RunRoot) -> list[int]:
    lines = root.read_text("train/round-0/metrics.jsonl").splitlines()
    return [json.loads(line)["step"] for line in lines if line]


@pytest.mark.timeout(900)
def test_killed_worker_resumes_from_checkpoint_then_rerun_and_predict(labelled_s3_run, tmp_path):
    from pycocotools.coco import COCO

    from u2seg.labels import decode_panoptic_png, validate_panoptic
    from u2seg.model import model_from_bytes
    from u2seg.pipeline.predict import run_predict
    from u2seg.pipeline.train import run_train_round

    cfg, root, fs, prep_s = labelled_s3_run
    prefix = root.path("train", "round-0")
    t0 = time.time()
    job = Background(run_train_round, cfg, root, 0, "labels")

    ckpt_step = None
    while ckpt_step is None:
        assert job.alive(), f"training ended before its first checkpoint: {job.error or job.result}"
        assert time.time() - t0 < 600, "no checkpoint registered in S3 within 600s"
        time.sleep(0.2)
        ckpt_step = registered_checkpoint_step(fs, prefix)
    pids = train_worker_pids()
    assert len(pids) == 2, f"expected 2 live {WORKER_CLASS} actors, found pids {pids}"
    assert job.alive(), "training finished before a worker could be killed"
    os.kill(pids[-1], signal.SIGKILL)  # the workers of the local 2-node cluster run on this machine
    killed_at = time.time() - t0

    stats = job.join(600)
    first_wall = time.time() - t0
    assert stats["steps"] == STEPS and stats["workers"] == 2
    steps = metric_steps(root)
    # The final attempt records its own steps: they start right after a checkpoint, not at step 1.
    assert steps[-1] == STEPS and steps == list(range(steps[0], STEPS + 1)), steps
    resumed_from = steps[0] - 1
    assert resumed_from >= ckpt_step >= EVERY and resumed_from % EVERY == 0, (steps, ckpt_step)
    first = json.loads(root.read_text("train/round-0/metrics.jsonl").splitlines()[0])
    assert first["start_step"] == resumed_from
    assert pids[-1] not in train_worker_pids()

    # Rerunning the finished round resumes from its step-6 checkpoint: no step is trained again.
    t1 = time.time()
    again = run_train_round(cfg, root, 0, "labels")
    rerun_wall = time.time() - t1
    assert again["steps"] == STEPS
    assert metric_steps(root) == steps, "the rerun trained again instead of resuming"

    model, extra = model_from_bytes(root.read_bytes("train/round-0/model.pt"))
    assert extra["step"] == STEPS
    assert model.cfg.num_thing_classes == cfg.cluster.things_k
    assert model.cfg.num_stuff_classes == cfg.cluster.stuff_k

    pred = run_predict(cfg, root, 0)
    n_images = len(root.read_parquet("manifest", columns=["image_id"]))
    assert pred["images"] == n_images
    (tmp_path / "instances.json").write_bytes(root.read_bytes("predict/round-0/instances.json"))
    coco = COCO(str(tmp_path / "instances.json"))
    assert len(coco.imgs) == n_images
    for ann in coco.anns.values():
        assert 1 <= ann["category_id"] <= cfg.cluster.things_k
        assert coco.annToMask(ann).sum() == ann["area"] > 0
    pan = root.read_json("predict/round-0/panoptic.json")
    assert len(pan["annotations"]) == n_images
    assert len(pan["categories"]) == cfg.cluster.things_k + cfg.cluster.stuff_k
    images = {i["id"]: i for i in pan["images"]}
    for ann in pan["annotations"][:4]:
        ids = decode_panoptic_png(root.read_bytes("predict/round-0/panoptic", ann["file_name"]))
        assert ids.shape == (images[ann["image_id"]]["height"], images[ann["image_id"]]["width"])
        assert ids.dtype.kind in "iu" and np.all(ids >= 0)
        assert validate_panoptic(ids, ann["segments_info"], categories=pan["categories"]) == []
    print(f"\nTRAIN_RESULT stages_s={prep_s:.1f} checkpoint_seen_at_step={ckpt_step} "
          f"killed_at_s={killed_at:.1f} resumed_from={resumed_from} recorded_steps={steps} "
          f"first_run_s={first_wall:.1f} rerun_s={rerun_wall:.1f} predict_instances={pred['instances']}")
