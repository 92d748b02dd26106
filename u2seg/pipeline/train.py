"""The train stage on Ray Train: DDP workers fed by Ray Data, checkpoints in the run root.

``train/round-R/`` holds Ray Train's checkpoints (``RunConfig(storage_path=<root>/train,
name=round-R)``, local or S3) plus ``metrics.jsonl`` and ``model.pt`` (the final model, for predict).
Round 0 trains on the pseudo-labels; each self-training round R first predicts the training images
with round R-1's model and rebuilds the labels from its confident predictions by CutLER's rule
(``selftrain.py``). The recipe (optimizer over Detectron2's parameter groups, warmup + multi-step lr
schedule stepped every step and restored with the checkpoint, per-parameter or global gradient clipping,
standard or cascade heads) comes from ``train.*`` (``u2seg/configs/coco.yaml``: U2Seg's); the lr of every
step is in ``metrics.jsonl``.
A lost worker restarts the worker group from the latest checkpoint (``FailureConfig``); rerunning the
same command resumes the same run name from its latest checkpoint instead of starting over.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from u2seg.config import TrainConfig, U2SegConfig, config_from_dict
from u2seg.io import RunRoot, layout
from u2seg.io.labelset import LabelSet
from u2seg.pipeline.progress import StageProgress
from u2seg.pipeline.scalars import require_mlflow
from u2seg.pipeline.train_data import batch_indices, label_set_rows, load_rows

log = logging.getLogger(__name__)

CKPT_FILE = layout.MODEL_FILE  # also the file name inside each Ray Train checkpoint


def model_config(cfg: U2SegConfig, k_things: int, k_stuff: int) -> Any:
    from u2seg.model import ModelConfig

    train_cfg = cfg.train
    return ModelConfig(backbone=train_cfg.backbone, weights=train_cfg.weights, num_thing_classes=k_things,
                       num_stuff_classes=k_stuff, image_size=224, min_size=min(800, train_cfg.image_size),
                       max_size=train_cfg.image_size, drop_loss_iou=train_cfg.drop_loss_iou,
                       roi_heads=train_cfg.roi_heads, semantic_loss_weight=train_cfg.semantic_loss_weight,
                       box_batch_size_per_image=train_cfg.roi_batch_size, pyramid_channels=train_cfg.fpn_channels,
                       representation_size=train_cfg.box_head_dim,
                       mask_head_layers=(train_cfg.fpn_channels,) * train_cfg.mask_head_convs,
                       amp=train_cfg.amp, seed=cfg.run.seed)


def make_model(cfg: U2SegConfig, k_things: int, k_stuff: int) -> Any:
    """The network ``train.*`` describes, its backbone weights (``train.weights``: file or s3://) loaded."""
    from u2seg.model import build_model

    return build_model(model_config(cfg, k_things, k_stuff), storage_options=cfg.run.storage.storage_options())


def make_optimizer(model: Any, train_cfg: TrainConfig) -> Any:
    """``train.optimizer`` over Detectron2's parameter groups of ``model`` (no weight decay on norm layers)."""
    from u2seg.model import build_optimizer

    return build_optimizer(model, train_cfg.optimizer, train_cfg.lr, train_cfg.weight_decay, train_cfg.momentum)


def make_lr_scheduler(optimizer: Any, train_cfg: TrainConfig, start_step: int = 0) -> Any:
    """The warmup + multi-step schedule, stepped once after every optimizer step. To resume at ``start_step``
    the optimizer's state must be loaded first (it carries each group's initial lr)."""
    from u2seg.model import build_lr_scheduler

    return build_lr_scheduler(optimizer, warmup_steps=train_cfg.warmup_steps, warmup_factor=train_cfg.warmup_factor,
                              lr_steps=train_cfg.lr_steps, gamma=train_cfg.lr_gamma, start_step=start_step)


def scheduled_lr(train_cfg: TrainConfig, step: int) -> float:
    """The lr of 0-based optimizer step ``step`` under ``train_cfg`` (what metrics.jsonl records)."""
    from u2seg.model import lr_at

    return lr_at(step, train_cfg.lr, warmup_steps=train_cfg.warmup_steps, warmup_factor=train_cfg.warmup_factor,
                 lr_steps=train_cfg.lr_steps, gamma=train_cfg.lr_gamma)


def optimize_step(net: Any, optimizer: Any, scheduler: Any, batch: list[dict[str, Any]], scaler: Any,
                  train_cfg: TrainConfig) -> dict[str, float]:
    """One step of the recipe: forward/backward, ``train.clip`` at ``train.clip_norm``, the optimizer step, then
    the schedule's step. Returns the losses and the lr this step ran at."""
    from u2seg.model.train import train_step

    lr = float(optimizer.param_groups[0]["lr"])
    losses = train_step(net, optimizer, batch, scaler, max_grad_norm=train_cfg.clip_norm, clip=train_cfg.clip)
    scheduler.step()
    return {**losses, "lr": lr}


def augment_config(cfg: U2SegConfig) -> Any:
    from u2seg.model import AugmentConfig

    s = cfg.train.image_size
    shorts = tuple(sorted({max(32, int(s * f)) for f in (0.5, 0.625, 0.75, 0.875, 1.0)}))
    return AugmentConfig(short_sizes=shorts, max_size=s, copy_paste_prob=1.0 if cfg.train.copy_paste else 0.0)


class _DDPStep:
    """What u2seg.model.train_step needs of a model (device, cfg, train(), parameters(), call), over DDP."""

    def __init__(self, ddp: Any, model: Any):
        self.ddp, self.device, self.cfg = ddp, model.device, model.cfg

    def train(self) -> None:
        self.ddp.train()

    def parameters(self) -> Any:  # train_step clips gradients over these
        return self.ddp.parameters()

    def __call__(self, *args: Any) -> Any:
        return self.ddp(*args)


def append_metrics(root: RunRoot, rel: str, rows: list[dict[str, Any]], *, keep_upto: int) -> None:
    """Append ``rows`` to ``metrics.jsonl``, first dropping recorded steps after ``keep_upto``.

    An attempt killed after it recorded steps but before their checkpoint was committed is resumed from
    an earlier step; those steps are trained again and must appear once, with the later attempt's values.
    """
    kept = []
    if root.exists(rel):
        for line in root.read_text(rel).splitlines():
            try:
                if json.loads(line)["step"] <= keep_upto:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):  # a torn or foreign line: drop it
                continue
    root.write_text(rel, "".join(kept) + "".join(json.dumps(r) + "\n" for r in rows))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One DDP rank: build, maybe restore, then step through its Ray Data shard until ``steps``."""
    import ray.train
    import torch

    from u2seg.model import augment_batch, model_from_bytes, model_to_bytes, targets_from_labels, transfer_from_bytes
    from u2seg.pipeline.scalars import open_scalars

    cfg = config_from_dict(config["cfg"])
    train_cfg = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_cuda = torch.cuda.is_available() and config["use_gpu"]
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if use_cuda else "cpu")
    torch.manual_seed(cfg.run.seed)
    if not use_cuda:
        torch.set_num_threads(max(1, int(config.get("cpu_threads", 1))))
    model = make_model(cfg, config["k_things"], config["k_stuff"]).to(device)
    mcfg = model.cfg
    optimizer = make_optimizer(model, train_cfg)
    scaler = torch.amp.GradScaler("cuda") if use_cuda and mcfg.amp == "fp16" else None
    step = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d, open(os.path.join(d, CKPT_FILE), "rb") as fh:
            _, extra = model_from_bytes(fh.read(), map_location=device, optimizer=optimizer, model=model)
        step = int(extra["step"])
        if scaler is not None and extra.get("grad_scaler"):
            scaler.load_state_dict(extra["grad_scaler"])
        if rank == 0:
            log.info("train: resumed from checkpoint at step %d", step)
    elif config.get("init_model_rel") and config.get("init_transfer"):  # fine-tuning for other classes
        moved = transfer_from_bytes(config["root"].read_bytes(config["init_model_rel"]), model, map_location=device)
        if rank == 0:
            log.info("train: initialised from %s: %d tensors kept, class layers re-initialised (%s)",
                     config["init_model_rel"], len(moved["copied"]), ", ".join(moved["reinitialised"]))
    elif config.get("init_model_rel"):  # a self-training round starts from the previous round's model (CutLER)
        model_from_bytes(config["root"].read_bytes(config["init_model_rel"]), map_location=device, model=model)
        if rank == 0:
            log.info("train: initialised from %s", config["init_model_rel"])
    scheduler = make_lr_scheduler(optimizer, train_cfg, start_step=step)
    if rank == 0:
        log.info("train: %s lr %g (step %d: %g), global batch %d x %d, clip %s %g, %s heads", train_cfg.optimizer,
                 train_cfg.lr, step, optimizer.param_groups[0]["lr"], world, train_cfg.batch_size, train_cfg.clip,
                 train_cfg.clip_norm, train_cfg.roi_heads)
    net: Any = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if use_cuda else None, find_unused_parameters=True)
        net = _DDPStep(ddp, model)
    aug = augment_config(cfg)
    rows = ray.get(config["rows"])
    scalars = open_scalars(config["root"], config["tensorboard_rel"], rank=rank, mlflow_uri=train_cfg.mlflow_uri,
                           start_step=step)
    history: list[dict[str, Any]] = []
    start_step, t0, cpu0 = step, time.time(), time.process_time()
    recorded_upto = start_step  # metrics.jsonl rows up to this step belong to the curve
    load = partial(load_rows, root=config["root"], max_side=train_cfg.image_size,
                   storage_options=cfg.run.storage.storage_options(), retry_s=cfg.run.storage.retry_s)
    plan = partial(batch_indices, n_rows=len(rows), batch_size=train_cfg.batch_size, rank=rank, world=world,
                   seed=cfg.run.seed)
    with ThreadPoolExecutor(max_workers=1) as prefetch:  # the next batch decodes while this one trains
        upcoming = prefetch.submit(load, [rows[i] for i in plan(step)])
        while step < train_cfg.steps:
            batch = upcoming.result()
            if step + 1 < train_cfg.steps:
                upcoming = prefetch.submit(load, [rows[i] for i in plan(step + 1)])
            samples = [targets_from_labels(img, seg, segs, config["k_things"]) for img, seg, segs in batch]
            samples = [s for s in samples if len(s["boxes"])] or samples
            # one generator per (seed, rank, step): augmentation does not depend on where a run resumed
            gen = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + rank * 7919 + step)
            losses = optimize_step(net, optimizer, scheduler, augment_batch(samples, aug, gen), scaler, train_cfg)
            step += 1
            elapsed = time.time() - t0  # this attempt's own steps only: a resumed run starts at start_step
            rate = (step - start_step) * train_cfg.batch_size * world / max(elapsed, 1e-9)
            metrics = {"step": step, "rank": rank, "start_step": start_step, "elapsed_s": round(elapsed, 4),
                       "cpu_s": round(time.process_time() - cpu0, 4), "images_per_s": round(rate, 4), **losses}
            history.append(metrics)
            scalars.log(step, metrics)
            last = step >= train_cfg.steps
            if step % train_cfg.checkpoint_every == 0 or last:
                if rank == 0:  # the curve so far survives a kill; rows past a checkpoint are never kept twice
                    append_metrics(config["root"], config["metrics_rel"], history, keep_upto=recorded_upto)
                    history, recorded_upto = [], step
                    scalars.sync()
                with tempfile.TemporaryDirectory() as d:
                    ckpt_obj = None
                    if rank == 0:
                        with open(os.path.join(d, CKPT_FILE), "wb") as fh:
                            state = {"step": step, **({"grad_scaler": scaler.state_dict()} if scaler else {})}
                            fh.write(model_to_bytes(model, optimizer=optimizer, extra=state))
                        ckpt_obj = ray.train.Checkpoint.from_directory(d)
                    ray.train.report(metrics, checkpoint=ckpt_obj)
    scalars.close()
    if rank == 0:
        root: RunRoot = config["root"]
        root.write_bytes(config["model_rel"], model_to_bytes(model, extra={"step": step}))


def run_train_round(cfg: U2SegConfig, root: RunRoot, round_idx: int) -> dict[str, Any]:
    """Train ``train/round-R`` on its label set; resumes a killed or rerun round from its checkpoint."""
    k_things, k_stuff = layout.class_counts(root)
    prev = layout.round_model(round_idx - 1)
    stats = fit_model(cfg, root, name=layout.round_name(round_idx), storage_dir=layout.TRAIN,
                      label_dir=layout.round_labels(round_idx), k_things=k_things, k_stuff=k_stuff,
                      init_model_rel=prev if round_idx > 0 and root.exists(prev) else None, stage="train")
    return {"round": round_idx, **stats}


def fit_model(cfg: U2SegConfig, root: RunRoot, *, name: str, storage_dir: str, label_dir: str, k_things: int,
              k_stuff: int, init_model_rel: str | None = None, init_transfer: bool = False,
              stage: str = "train") -> dict[str, Any]:
    """Train ``cfg.train`` on the label set ``label_dir`` into ``<storage_dir>/<name>/`` (Ray Train's
    checkpoints, ``metrics.jsonl``, ``tensorboard/``, ``model.pt``); resumes a killed or rerun run from its
    checkpoint. It starts from ``init_model_rel`` when given: all of it (a self-training round), or with
    ``init_transfer`` all but its class layers (fine-tuning for other classes). Progress goes to ``stage``'s
    ``_PROGRESS.json``."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from u2seg.pipeline.train_progress import progress_callbacks

    train_cfg = cfg.train
    require_mlflow(train_cfg.mlflow_uri)
    rows = label_set_rows(LabelSet(root, label_dir, k_things, k_stuff),
                          skip_without_things=train_cfg.images_without_things == "skip")
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = train_cfg.use_gpu == "yes" or (train_cfg.use_gpu == "auto" and gpus >= train_cfg.num_workers)
    folder = layout.part(storage_dir, name)
    progress = StageProgress(root, stage, train_cfg.steps, "step", phase=f"train {name}", start_done=None,
                             every_s=cfg.run.progress_every_s)
    run_config = ray.train.RunConfig(
        name=name, storage_path=root.path(storage_dir),
        storage_filesystem=None if root.is_local else root.pyarrow_fs(),
        failure_config=ray.train.FailureConfig(max_failures=train_cfg.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2), callbacks=progress_callbacks(progress))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "k_things": k_things, "k_stuff": k_stuff, "root": root,
                           "rows": ray.put(rows), "use_gpu": use_gpu, "metrics_rel": layout.training_metrics(folder),
                           "tensorboard_rel": layout.training_tensorboard(folder),
                           "model_rel": layout.trained_model(folder),
                           "cpu_threads": 1, "init_model_rel": init_model_rel, "init_transfer": init_transfer},
        scaling_config=ray.train.ScalingConfig(num_workers=train_cfg.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=None if use_gpu else {"CPU": 1}),
        run_config=run_config,
    )
    t0 = time.time()
    with progress.guard():
        result = trainer.fit()
    wall = time.time() - t0
    final = dict(result.metrics or {})
    progress.finish(int(final.get("step", 0)), start_done=final.get("start_step"))
    log.info("train %s: %s", folder, {k: final.get(k) for k in ("step", "loss_total")})
    return {"steps": int(final.get("step", 0)), "loss_total": final.get("loss_total"),
            "train_images": len(rows), "workers": train_cfg.num_workers, "use_gpu": use_gpu,
            "train_seconds": round(wall, 1), "label_dir": label_dir,
            "samples_per_s": final.get("images_per_s")}


def kept_round_stats(cfg: U2SegConfig, root: RunRoot, round_idx: int) -> dict[str, Any] | None:
    """The stats of a round whose final ``model.pt`` is written (it finished with this config: any other change
    resets the stage), from its ``metrics.jsonl``; None when it has to train. Rerunning with more
    ``train.rounds`` thus starts no Ray Train worker group just to find round 0 at its last step."""
    if not root.exists(layout.round_model(round_idx)) or not root.exists(layout.round_metrics(round_idx)):
        return None
    rows = [json.loads(line) for line in root.read_text(layout.round_metrics(round_idx)).splitlines() if line]
    last = max((r for r in rows if r.get("rank", 0) == 0), key=lambda r: r["step"], default=None)
    if last is None or int(last["step"]) < cfg.train.steps:
        return None
    log.info("train: %s already trained (step %d), kept", layout.round_name(round_idx), last["step"])
    return {"round": round_idx, "steps": int(last["step"]), "loss_total": last.get("loss_total"), "kept": True,
            "label_dir": layout.round_labels(round_idx)}


def run_train(cfg: U2SegConfig, root: RunRoot) -> dict[str, Any]:
    """Round 0 on the pseudo-labels, then ``train.rounds`` self-training rounds (predict, relabel, train).

    A finished self-training round is kept (rerunning with more rounds trains only the new ones); rounds
    past ``train.rounds`` are removed.
    """
    from u2seg.pipeline.predict import predict_images
    from u2seg.pipeline.selftrain import build_round_labels

    last = cfg.train.rounds
    for r in sorted(set(layout.rounds_with(root, layout.TRAIN)) | set(layout.rounds_with(root, layout.SELFTRAIN))):
        if r > last:
            log.info("train: removing round %d (train.rounds=%d)", r, last)
            root.remove(layout.train_round(r), recursive=True)
            root.remove(layout.selftrain_round(r), recursive=True)
    rounds = [kept_round_stats(cfg, root, 0) or run_train_round(cfg, root, 0)]
    for r in range(1, last + 1):
        if root.exists(layout.round_model(r)):
            log.info("train: self-training round %d already trained, kept", r)
            continue
        predicted = predict_images(cfg, root, r - 1, layout.round_predictions(r - 1), layout.LEDGER, stage="train",
                                   min_instance_score=cfg.train.score_threshold)
        relabel = build_round_labels(cfg, root, r)
        stats = run_train_round(cfg, root, r)
        rounds.append({**stats, "predicted_images": predicted["images"],
                       **{k: relabel[k] for k in ("pred_things", "old_kept", "old_replaced")}})
    return {**rounds[0], "rounds": rounds, "steps": sum(r["steps"] for r in rounds)}
