"""Train stage on the 2-node Ray cluster, run root on S3: a killed worker resumes, and so does a rerun.

One tiny run (6 synthetic images on S3 through manifest/extract/cluster/label) trains 6 steps with 2 DDP
workers and a checkpoint every 2 steps, with U2Seg's recipe in small: a ResNet-18 backbone whose weights the
workers read from S3, SGD with a warmup and a decay step, per-parameter clipping; the lr of
every recorded step must be the schedule's, across the kill. As soon as the first checkpoint is registered in
S3, one Ray Train worker process is SIGKILLed (a crash, not a polite ``ray.kill``); the round must still end at
step 6, and the steps it records must start after a checkpoint (resumed), not at 1 (restarted). A second
``run_train_round`` of the same round must resume at step 6 and train nothing. Then predict writes
``predict/`` in the label format, which must load in pycocotools and pass the panoptic rules.
The run is a module fixture and the three checks are separate tests, each with its own timeout: on this
shared 2-core machine the labelled run root plus the killed training alone take 10-14 minutes.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from helpers import Background  # tests/ is on sys.path (conftest)

from u2seg.io import RunRoot
from u2seg.pipeline.run_stage import run_stage

pytestmark = pytest.mark.integration

STEPS, EVERY = 6, 2
TRAIN_KNOBS = [f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}", "train.num_workers=2",
               "train.batch_size=1", "train.image_size=96", "train.rounds=0", "train.max_failures=3",
               "cluster.num_shards=1", "train.backbone=resnet18", "train.optimizer=sgd", "train.lr=0.01",
               "train.weight_decay=0.00005", "train.warmup_steps=3", "train.warmup_factor=0.1", "train.lr_steps=[4]",
               "train.lr_gamma=0.1", "train.clip=per_param"]  # cascade heads: unit-tested (3x the box-head cost here)
WORKER_CLASS = "RayTrainWorker"  # Ray Train V2's per-rank actor (ray/train/v2/.../worker_group/worker.py)


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


def resnet18_weights() -> bytes:
    """A torchvision ResNet-18 (seeded random weights) saved as DINO saves its ResNet-50: a torch state dict."""
    import io

    import torch
    import torchvision

    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(torchvision.models.resnet18().state_dict(), buf)
    return buf.getvalue()


@dataclass
class KilledRun:
    """A trained round-0 whose first attempt lost a worker, and what the test saw while it ran."""

    cfg: Any
    root: RunRoot
    stats: dict[str, Any]
    checkpoint_step: int
    killed_pid: int
    killed_at_s: float
    stages_s: float
    train_s: float


@pytest.fixture(scope="module")
def killed_run(ray_cluster, s3, synthetic_world) -> KilledRun:
    """6 images on S3 labelled (manifest/extract/cluster/label), then round 0 trained on 2 workers while
    one worker is SIGKILLed right after the first checkpoint is registered in S3."""
    import s3fs
    from helpers import tiny_config

    from u2seg.pipeline.train import run_train_round

    t0 = time.time()
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3.storage_options())
    data = f"{s3.bucket}/train-world-{time.time_ns()}"
    for name in sorted(p.name for p in (synthetic_world / "images").iterdir())[:6]:
        fs.pipe_file(f"{data}/images/{name}", (synthetic_world / "images" / name).read_bytes())
    fs.pipe_file(f"{data}/weights/resnet18.pth", resnet18_weights())
    root_uri = s3.uri(f"train-run-{time.time_ns()}")
    cfg = tiny_config(root_uri, [f"s3://{data}/images"], s3, *TRAIN_KNOBS,
                      f"train.weights=s3://{data}/weights/resnet18.pth")
    for stage in ("manifest", "stuff", "extract", "cluster", "label"):
        run_stage(stage, cfg)
    root = RunRoot(root_uri, cfg.run.storage.storage_options())
    stages_s = time.time() - t0

    t1 = time.time()
    job = Background(run_train_round, cfg, root, 0)
    prefix = root.path("train", "round-0")
    ckpt_step = None
    while ckpt_step is None:
        assert job.alive(), f"training ended before its first checkpoint: {job.error or job.result}"
        assert time.time() - t1 < 600, "no checkpoint registered in S3 within 600s"
        time.sleep(0.2)
        ckpt_step = registered_checkpoint_step(fs, prefix)
    pids = train_worker_pids()
    assert len(pids) == 2, f"expected 2 live {WORKER_CLASS} actors, found pids {pids}"
    assert job.alive(), "training finished before a worker could be killed"
    os.kill(pids[-1], signal.SIGKILL)  # the workers of the local 2-node cluster run on this machine
    killed_at = time.time() - t1
    stats = job.value(600)
    return KilledRun(cfg, root, stats, ckpt_step, pids[-1], killed_at, stages_s, time.time() - t1)


def metric_steps(root: RunRoot) -> list[int]:
    lines = root.read_text("train/round-0/metrics.jsonl").splitlines()
    return [json.loads(line)["step"] for line in lines if line]


@pytest.mark.timeout(900)
def test_killed_worker_resumes_from_the_last_checkpoint(killed_run):
    run = killed_run
    assert run.stats["steps"] == STEPS and run.stats["workers"] == 2
    steps = metric_steps(run.root)
    # One complete curve across the kill: every step once. Steps up to the checkpoint the final attempt
    # resumed from were recorded by the killed attempt, the rest by the final one.
    assert steps == list(range(1, STEPS + 1)), steps
    rows = [json.loads(line) for line in run.root.read_text("train/round-0/metrics.jsonl").splitlines()]
    resumed_from = rows[-1]["start_step"]
    assert resumed_from >= run.checkpoint_step >= EVERY, (rows, run.checkpoint_step)
    assert resumed_from % EVERY == 0, rows
    assert all(r["start_step"] == resumed_from for r in rows if r["step"] > resumed_from), rows
    assert all(r["start_step"] < resumed_from for r in rows if r["step"] <= resumed_from), rows
    # the schedule continued across the kill: row "step" s ran optimizer step s - 1 at lr_at(s - 1)
    from u2seg.pipeline.train import scheduled_lr

    assert [r["lr"] for r in rows] == pytest.approx([scheduled_lr(run.cfg.train, s - 1) for s in steps], rel=1e-9)
    assert [r["lr"] for r in rows] == pytest.approx([0.001, 0.004, 0.007, 0.01, 0.001, 0.001], rel=1e-9)
    assert run.killed_pid not in train_worker_pids()
    print(f"\nTRAIN_RESULT stages_s={run.stages_s:.1f} checkpoint_seen_at_step={run.checkpoint_step} "
          f"killed_at_s={run.killed_at_s:.1f} resumed_from={resumed_from} recorded_steps={steps} "
          f"train_s={run.train_s:.1f}")


@pytest.mark.timeout(900)
def test_rerun_resumes_the_finished_round_and_model_loads(killed_run):
    from u2seg.model import model_from_bytes
    from u2seg.pipeline.train import run_train_round

    cfg, root = killed_run.cfg, killed_run.root
    before = metric_steps(root)
    t0 = time.time()
    again = run_train_round(cfg, root, 0)
    assert again["steps"] == STEPS
    assert metric_steps(root) == before, "the rerun trained again instead of resuming"
    model, extra = model_from_bytes(root.read_bytes("train/round-0/model.pt"))
    assert extra["step"] == STEPS
    assert model.cfg.num_thing_classes == cfg.cluster.things_k
    assert model.cfg.num_stuff_classes == cfg.cluster.stuff_k
    assert (model.cfg.backbone, model.cfg.weights) == ("resnet18", "none")
    print(f"\nTRAIN_RERUN_RESULT rerun_s={time.time() - t0:.1f} steps={again['steps']}")


PREDICT_DRIVER = """
import sys
from u2seg.config import load_config
from u2seg.io import layout
from u2seg.pipeline.predict import predict_images
from u2seg.pipeline.ray_session import ensure_ray
from u2seg.pipeline.run_stage import open_root
cfg = load_config(sys.argv[1])
ensure_ray(cfg)
predict_images(cfg, open_root(cfg), 0, layout.PREDICT, layout.LEDGER)
"""


@pytest.mark.timeout(900)
def test_a_sigkilled_predict_resumes_with_only_the_missing_images(killed_run, tmp_path):
    """A predict driver SIGKILLed after its first committed group; a new one predicts exactly the rest, and every
    image is predicted once (ledger ids == extract's ok images, each label group with its ledger part)."""
    import subprocess
    import sys

    from test_faults import REPO, kill_ray_processes, private_ray, tail, wait_for

    from u2seg.io import layout
    from u2seg.io.labelset import LabelSet
    from u2seg.pipeline.predict import predict_images

    cfg, root = killed_run.cfg, killed_run.root
    overrides = ["predict.rows_per_part=1", "predict.batch_size=1", "run.ray_num_cpus=4"]
    from helpers import tiny_config

    pcfg = tiny_config(cfg.run.run_root, cfg.manifest.inputs, None, *TRAIN_KNOBS, *overrides,
                       *[f"run.storage.{k}={v}" for k, v in (("endpoint_url", cfg.run.storage.endpoint_url),
                                                             ("key", cfg.run.storage.key),
                                                             ("secret", cfg.run.storage.secret),
                                                             ("region", cfg.run.storage.region))])
    yaml_path = tmp_path / "predict.yaml"
    yaml_path.write_text(pcfg.to_yaml(redact=False))
    script = tmp_path / "predict_driver.py"
    script.write_text(PREDICT_DRIVER)
    log_path = str(tmp_path / "predict.log")
    with private_ray() as (ray_tmp, env), open(log_path, "ab") as log_file:
        driver = subprocess.Popen([sys.executable, str(script), str(yaml_path)], cwd=REPO, env=env, stdout=log_file,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(lambda: root.list("predict/ledger", ".parquet") or driver.poll() is not None, 600,
                     "the first predicted group", every=0.05)
            assert driver.poll() is None, f"driver exited ({driver.returncode}) early:\n{tail(log_path)}"
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(30)
            kill_ray_processes(ray_tmp, pgid=driver.pid)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
    ok = {r["image_id"] for r in root.read_parquet(layout.LEDGER).to_pylist() if r["status"] == "ok"}
    done = root.read_parquet("predict/ledger").column("image_id").to_pylist()
    assert 0 < len(done) < len(ok)
    stats = predict_images(pcfg, root, 0, layout.PREDICT, layout.LEDGER)
    assert stats["predicted_now"] == len(ok) - len(done), stats
    ledger = root.read_parquet("predict/ledger").to_pylist()
    ids = [r["image_id"] for r in ledger]
    assert len(ids) == len(set(ids)) and set(ids) == ok and all(r["status"] == "ok" for r in ledger)
    labels = LabelSet(root, layout.PREDICT)
    assert set(labels.groups()) == {r["group"] for r in ledger}
    assert sorted(im.image_id for im in labels.iter_images()) == sorted(ok)
    print(f"\nPREDICT_RESUME_RESULT images={len(ok)} done_at_kill={len(done)} "
          f"predicted_on_rerun={stats['predicted_now']} orphans_removed={stats['orphans_removed']}")


@pytest.mark.timeout(900)
def test_predict_writes_valid_coco_and_panoptic(killed_run, tmp_path):
    from pycocotools.coco import COCO

    from u2seg.labels import decode_panoptic_png, validate_panoptic
    from u2seg.pipeline.predict import run_predict

    cfg, root = killed_run.cfg, killed_run.root
    t0 = time.time()
    pred = run_predict(cfg, root)  # after the resumed run above: nothing left to predict, the set is merged
    n_images = len(root.read_parquet("manifest", columns=["image_id"]))
    assert pred["images"] == n_images and pred["predicted_now"] == 0
    (tmp_path / "instances.json").write_bytes(root.read_bytes("predict/instances.json"))
    coco = COCO(str(tmp_path / "instances.json"))
    assert len(coco.imgs) == n_images
    for ann in coco.anns.values():
        assert 1 <= ann["category_id"] <= cfg.cluster.things_k
        assert coco.annToMask(ann).sum() == ann["area"] > 0
    pan = root.read_json("predict/panoptic.json")
    assert len(pan["annotations"]) == n_images
    assert len(pan["categories"]) == cfg.cluster.things_k + cfg.cluster.stuff_k
    images = {i["id"]: i for i in pan["images"]}
    for ann in pan["annotations"][:4]:
        ids = decode_panoptic_png(root.read_bytes("predict/panoptic", ann["file_name"]))  # <group>/<id>.png
        assert ids.shape == (images[ann["image_id"]]["height"], images[ann["image_id"]]["width"])
        assert ids.dtype.kind in "iu" and np.all(ids >= 0)
        assert validate_panoptic(ids, ann["segments_info"], categories=pan["categories"]) == []
    print(f"\nTRAIN_PREDICT_RESULT predict_s={time.time() - t0:.1f} images={pred['images']} "
          f"instances={pred['instances']}")
