"""The stuff stage: STEGO's head and cluster probe, trained on frozen backbone features with Ray Train.

1. A sample of ``stuff.train_images`` manifest images, chosen by a seeded hash of their ids (the same sample
   whatever the part layout).
2. STEGO's five crops of each (``u2seg/stuff/crops.py``) and a global descriptor per crop, from an actor pool
   running the backbone (``extract.backbone``, frozen); each crop's ``stuff.neighbors`` nearest other crops by
   cosine (faiss) are its positives.
3. Ray Train workers compute the backbone features of each batch of crops and of their kNN positives on the
   fly (nothing of size images x grid x channels is stored) and take STEGO's training steps
   (``u2seg/stuff/stego.py``); checkpoints let a killed run resume.
4. ``stuff/head.pt``: the head and probe in STEGO's key format, which extract applies in the same backbone
   pass that feeds MaskCut. With ``stuff.checkpoint`` a trained head (a STEGO checkpoint's state dict) is
   loaded instead of training. With ``stuff.method=kmeans`` the stage does nothing (the baseline clusters
   pooled patch tokens in the cluster stage).

The head is trained once per stuff config: a rerun over a grown bucket keeps it, so stuff class ids stay
stable (like ``cluster.refit=assign_new``); a changed stuff knob trains a new one.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import time
from collections import OrderedDict
from typing import Any

import numpy as np

from u2seg.config import U2SegConfig, config_from_dict
from u2seg.io import RunRoot, layout
from u2seg.pipeline.markers import fingerprint
from u2seg.pipeline.progress import Progress, StageProgress
from u2seg.pipeline.scalars import require_mlflow

log = logging.getLogger(__name__)

HEAD_FORMAT = "u2seg-stego-head-1"
N_CROPS = 5


def stego_config(cfg: U2SegConfig) -> Any:
    """The pure trainer's config from the run's ``stuff`` section (STEGO's preset shifts and weights)."""
    from u2seg.stuff.stego import StegoTrainConfig

    st = cfg.stuff
    return StegoTrainConfig.from_preset(st.preset, code_dim=st.code_dim, n_classes=st.k, lr=st.lr,
                                        probe_lr=st.probe_lr, batch_size=st.batch_size, max_steps=st.steps,
                                        num_neighbors=st.neighbors, crop_ratio=st.crop_ratio, res=st.crop_size)


def head_bytes(head: Any, meta: dict[str, Any]) -> bytes:
    """``stuff/head.pt``: the head in STEGO's key format (so ``load_stego_head`` reads it) plus metadata."""
    import torch

    from u2seg.stuff.stego import stego_state_dict

    buf = io.BytesIO()
    torch.save({"state_dict": stego_state_dict(head), "format": HEAD_FORMAT, "meta": meta}, buf)
    return buf.getvalue()


def load_head(data: bytes, *, source: str = layout.STUFF_HEAD) -> Any:
    """A head from ``stuff/head.pt`` bytes or a STEGO checkpoint (read with ``weights_only=True``)."""
    import torch

    from u2seg.stuff.stego import load_stego_head

    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # a Lightning checkpoint pickles non-tensor objects (hyper-parameters)
        raise ValueError(f"{source} cannot be read safely (torch.load weights_only=True: {exc}); save its state "
                         "dict alone: torch.save(torch.load(path, weights_only=False)['state_dict'], out)") from exc
    return load_stego_head(obj).eval()


def head_classes(root: RunRoot) -> int:
    """Stuff classes of the run's head: its cluster probe's centres."""
    return int(load_head(root.read_bytes(layout.STUFF_HEAD)).n_clusters)


def read_head(root: RunRoot) -> Any:
    return load_head(root.read_bytes(layout.STUFF_HEAD))


# ----------------------------------------------------------------------------- the sample


def sample_images(root: RunRoot, n: int, seed: int) -> list[dict[str, str]]:
    """The ``n`` manifest images with the smallest seeded hash of their id (streamed part by part)."""
    best_keys = np.zeros(0, np.uint64)
    best_rows: list[dict[str, str]] = []
    for name in root.list(layout.MANIFEST, ".parquet"):
        table = root.read_part(layout.part(layout.MANIFEST, name), ["image_id", "uri"])
        ids, uris = table.column("image_id").to_pylist(), table.column("uri").to_pylist()
        keys = np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "big")
                         for i in ids], dtype=np.uint64)
        all_keys = np.concatenate([best_keys, keys])
        all_rows = best_rows + [{"image_id": i, "uri": u} for i, u in zip(ids, uris, strict=True)]
        order = np.argsort(all_keys, kind="stable")[:n]
        best_keys, best_rows = all_keys[order], [all_rows[i] for i in order]
    return sorted(best_rows, key=lambda r: r["image_id"])


def crop_batch(images: list[np.ndarray], crop_ratio: float, crop_size: int) -> Any:
    """STEGO's five crops of each image, ImageNet-normalised: float tensor [5 * len(images), 3, S, S]."""
    from u2seg.features import preprocess
    from u2seg.stuff.crops import five_crops

    crops = [c for img in images for c in five_crops(img, crop_ratio, crop_size)]
    return preprocess(crops, crop_size)


def feature_maps(model: Any, pixels: Any, amp: str) -> Any:
    """Final patch tokens of the frozen backbone as [B, C, h, w] (what STEGO's head reads)."""
    from u2seg.features import extract_features

    feats = extract_features(model, pixels, amp=amp)
    b, _, c = feats.tokens.shape
    return feats.tokens.transpose(1, 2).reshape(b, c, *feats.grid)


class CropDescriptorActor:
    """Holds the frozen backbone; turns a batch of sampled images into a global descriptor per crop."""

    def __init__(self, cfg_dict: dict[str, Any]):
        import torch

        from u2seg.config import resolve_device
        from u2seg.features.backbone import build_backbone

        self.cfg = config_from_dict(cfg_dict)
        ex, st = self.cfg.extract, self.cfg.stuff
        self.device = torch.device(resolve_device(self.cfg.run.device))
        self.model = build_backbone(ex.backbone, ex.weights, image_size=st.crop_size, seed=self.cfg.run.seed,
                                    storage_options=self.cfg.run.storage.storage_options()).to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from u2seg.io.inputs import InputUnreachableError, read_image
        from u2seg.pipeline.batch_retry import ItemFailure, call_per_item
        from u2seg.stuff.knn import global_descriptor

        st, storage = self.cfg.stuff, self.cfg.run.storage
        rows, images = [], []
        for image_id, uri in zip(batch["image_id"], batch["uri"], strict=True):
            try:
                images.append(read_image(str(uri), storage.storage_options(), storage.retry_s))
                rows.append((str(image_id), str(uri)))
            except InputUnreachableError:
                raise
            except Exception as exc:  # a bad image leaves the sample; extract records it as an error row
                log.warning("stuff: %s left out of the training sample: %s", uri, exc)

        def descriptors(imgs: list[np.ndarray]) -> list[np.ndarray]:
            d = global_descriptor(feature_maps(self.model, crop_batch(imgs, st.crop_ratio, st.crop_size),
                                               self.cfg.extract.amp)).float().cpu().numpy()
            return [d[i * N_CROPS:(i + 1) * N_CROPS] for i in range(len(imgs))]

        out_ids, out_uris, out_desc = [], [], []
        for (image_id, uri), d in zip(rows, call_per_item(descriptors, images, what="stuff descriptors"),
                                      strict=True):
            if isinstance(d, ItemFailure):
                log.warning("stuff: %s left out of the training sample: %s", uri, d.error)
                continue
            out_ids.append(image_id)
            out_uris.append(uri)
            out_desc.append(d.astype(np.float32).tobytes())
        return {"image_id": np.array(out_ids, dtype=object), "uri": np.array(out_uris, dtype=object),
                "descriptors": np.array(out_desc, dtype=object)}


def crop_descriptors(cfg: U2SegConfig, rows: list[dict[str, str]],
                     root: RunRoot | None = None) -> tuple[list[dict[str, str]], np.ndarray]:
    """(images kept, descriptors [5 * kept, C] in image-then-crop order), sorted by image id; progress in
    ``stuff/_PROGRESS.json`` when ``root`` is given."""
    import ray

    ds = ray.data.from_items(rows).map_batches(
        CropDescriptorActor, batch_size=max(1, cfg.extract.batch_size),
        compute=ray.data.ActorPoolStrategy(size=cfg.extract.num_actors), num_cpus=cfg.extract.cpus_per_actor,
        num_gpus=cfg.extract.gpus_per_actor, fn_constructor_kwargs={"cfg_dict": cfg.to_dict()})
    got: dict[str, tuple[str, np.ndarray]] = {}
    with Progress(len(rows), "stuff: crop descriptors", unit="img", root=root, stage="stuff" if root else None,
                  every_s=cfg.run.progress_every_s) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for image_id, uri, blob in zip(batch["image_id"], batch["uri"], batch["descriptors"], strict=True):
                got[str(image_id)] = (str(uri), np.frombuffer(blob, np.float32).reshape(N_CROPS, -1))
            bar.update(len(batch["image_id"]))
        bar.update(len(rows) - len(got), errors={"left_out": len(rows) - len(got)})  # unreadable: not trained on
    kept = sorted(got)
    if not kept:
        raise ValueError("stuff: no image of the training sample could be read")
    return ([{"image_id": i, "uri": got[i][0]} for i in kept], np.concatenate([got[i][1] for i in kept]))


# ----------------------------------------------------------------------------- training


class _CropCache:
    """A few decoded source images per worker: a crop and its neighbours often share an image."""

    def __init__(self, cfg: U2SegConfig, size: int = 64):
        self.cfg, self.size = cfg, size
        self.images: OrderedDict[str, np.ndarray] = OrderedDict()

    def crops(self, images: list[dict[str, str]], items: np.ndarray) -> Any:
        from u2seg.features import preprocess
        from u2seg.io.inputs import read_image
        from u2seg.stuff.crops import five_crops

        st, storage = self.cfg.stuff, self.cfg.run.storage
        out = []
        for item in items.tolist():
            uri = images[item // N_CROPS]["uri"]
            if uri not in self.images:
                self.images[uri] = read_image(uri, storage.storage_options(), storage.retry_s)
                if len(self.images) > self.size:
                    self.images.popitem(last=False)
            out.append(five_crops(self.images[uri], st.crop_ratio, st.crop_size)[item % N_CROPS])
        return preprocess(out, st.crop_size)


def stuff_train_loop(config: dict[str, Any]) -> None:
    """One Ray Train rank: frozen backbone, STEGO head + probe, steps until ``stuff.steps``; rank 0 saves."""
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    from u2seg.features.backbone import build_backbone
    from u2seg.pipeline.scalars import open_scalars
    from u2seg.pipeline.train import append_metrics
    from u2seg.pipeline.train_data import batch_indices
    from u2seg.stuff.knn import pick_positives
    from u2seg.stuff.stego import StegoHead, make_stego_optimizers, stego_train_step

    cfg = config_from_dict(config["cfg"])
    st, seed = cfg.stuff, cfg.run.seed
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if config["use_gpu"] else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    images, knn = ray.get(config["images"]), ray.get(config["knn"])
    backbone = build_backbone(cfg.extract.backbone, cfg.extract.weights, image_size=st.crop_size, seed=seed,
                              storage_options=cfg.run.storage.storage_options()).to(device)
    loss_cfg = stego_config(cfg)
    head = StegoHead(config["in_dim"], st.code_dim, st.k, generator=torch.Generator().manual_seed(seed)).to(device)
    optimizers = make_stego_optimizers(head, loss_cfg)
    step = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, "stuff.pt"), map_location=device, weights_only=True)
        head.load_state_dict(state["head"])
        for opt, opt_state in zip(optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        step = int(state["step"])
    cache = _CropCache(cfg)
    scalars = open_scalars(config["root"], layout.STUFF_TENSORBOARD, rank=rank, mlflow_uri=cfg.train.mlflow_uri,
                           run_name="stuff", start_step=step)

    def reduce_gradients() -> None:
        if world > 1:
            for p in head.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world

    every = max(1, min(st.steps, 100))
    history: list[dict[str, Any]] = []
    start_step = recorded_upto = step
    t0 = time.time()
    while step < st.steps:
        items = np.asarray(batch_indices(step, n_rows=len(knn), batch_size=st.batch_size, rank=rank, world=world,
                                         seed=seed))
        positives = pick_positives(knn, items, np.random.default_rng([seed, rank, step]))
        with torch.no_grad():
            feats = feature_maps(backbone, cache.crops(images, items), cfg.extract.amp).float()
            feats_pos = feature_maps(backbone, cache.crops(images, positives), cfg.extract.amp).float()
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + rank * 7919 + step)
        losses = stego_train_step(head, optimizers, feats, feats_pos, loss_cfg=loss_cfg, generator=generator,
                                  reduce_gradients=reduce_gradients)
        step += 1
        elapsed = time.time() - t0
        history.append({"step": step, "rank": rank, "elapsed_s": round(elapsed, 3),
                        "crops_per_s": round(2 * st.batch_size * world * (step - start_step) / max(elapsed, 1e-9), 3),
                        **losses})
        scalars.log(step, history[-1])
        if step % every == 0 or step >= st.steps:
            if rank == 0:
                append_metrics(config["root"], layout.training_metrics(layout.STUFF), history,
                               keep_upto=recorded_upto)
                history, recorded_upto = [], step
                scalars.sync()
            with tempfile.TemporaryDirectory() as d:
                checkpoint = None
                if rank == 0:
                    torch.save({"head": head.state_dict(), "optimizers": [o.state_dict() for o in optimizers],
                                "step": step}, os.path.join(d, "stuff.pt"))
                    checkpoint = ray.train.Checkpoint.from_directory(d)
                ray.train.report({"step": step, "start_step": start_step, **losses}, checkpoint=checkpoint)
    scalars.close()
    if rank == 0:
        meta = {"backbone": cfg.extract.backbone, "weights": cfg.extract.weights, "steps": step,
                "images": len(images), "crops": len(knn), "preset": st.preset}
        config["root"].write_bytes(layout.STUFF_HEAD, head_bytes(head.cpu().eval(), meta))


def train_head(cfg: U2SegConfig, root: RunRoot, images: list[dict[str, str]], knn: np.ndarray,
               in_dim: int) -> dict[str, Any]:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from u2seg.pipeline.train_progress import progress_callbacks

    st = cfg.stuff
    require_mlflow(cfg.train.mlflow_uri)
    progress = StageProgress(root, "stuff", st.steps, "step", phase="stuff: train", every_s=cfg.run.progress_every_s,
                             start_done=None)
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = cfg.run.device != "cpu" and gpus >= st.num_workers
    trainer = TorchTrainer(
        stuff_train_loop,
        train_loop_config={"cfg": cfg.to_dict(), "root": root, "images": ray.put(images), "knn": ray.put(knn),
                           "in_dim": in_dim, "use_gpu": use_gpu},
        scaling_config=ray.train.ScalingConfig(num_workers=st.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=None if use_gpu else {"CPU": 1}),
        run_config=ray.train.RunConfig(
            name="train", storage_path=root.path(layout.STUFF),
            storage_filesystem=None if root.is_local else root.pyarrow_fs(),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2), callbacks=progress_callbacks(progress)))
    t0 = time.time()
    with progress.guard():
        result = trainer.fit()
    final = dict(result.metrics or {})
    progress.finish(int(final.get("step", 0)), start_done=final.get("start_step"))
    return {"steps": int(final.get("step", 0)), "loss_total": final.get("loss/total"),
            "train_seconds": round(time.time() - t0, 1), "use_gpu": use_gpu}


def run_stuff(cfg: U2SegConfig, root: RunRoot) -> dict[str, Any]:
    """Train (or load) the stuff head into ``stuff/head.pt``; keep one made with this config."""
    st = cfg.stuff
    if st.method == "kmeans":
        return {"method": "kmeans", "output_fingerprint": fingerprint("kmeans")}
    if root.exists(layout.STUFF_HEAD):
        log.info("stuff: keeping the head made with this config (stuff classes stay stable)")
        return {"method": "stego", "kept": True, "k": head_classes(root),
                "output_fingerprint": layout.file_digest(root, layout.STUFF_HEAD)}
    in_dim = _backbone_dim(cfg)
    if st.checkpoint:
        from u2seg.io.inputs import read_input

        head = load_head(read_input(st.checkpoint, cfg.run.storage.storage_options(), cfg.run.storage.retry_s),
                         source=st.checkpoint)
        if head.in_dim != in_dim:
            raise ValueError(f"stuff.checkpoint {st.checkpoint} reads {head.in_dim}-d features but extract.backbone "
                             f"{cfg.extract.backbone} gives {in_dim}-d tokens")
        root.write_bytes(layout.STUFF_HEAD, head_bytes(head, {"loaded_from": st.checkpoint}))
        stats: dict[str, Any] = {"method": "stego", "loaded": st.checkpoint}
    else:
        from u2seg.stuff.knn import knn_indices

        t0 = time.time()
        sample = sample_images(root, st.train_images, cfg.run.seed)
        images, descriptors = crop_descriptors(cfg, sample, root)
        if len(descriptors) < st.neighbors + 1:
            raise ValueError(f"stuff: {len(images)} readable images give {len(descriptors)} crops, fewer than "
                             f"stuff.neighbors + 1 = {st.neighbors + 1}: raise stuff.train_images or add images")
        knn = knn_indices(descriptors, k=st.neighbors)
        t1 = time.time()
        trained = train_head(cfg, root, images, knn, in_dim)
        stats = {"method": "stego", "images": len(images), "sampled": len(sample), "crops": len(descriptors),
                 "phase_seconds": {"descriptors_knn": round(t1 - t0, 3), "train": trained["train_seconds"]},
                 **trained}
    return {**stats, "k": head_classes(root), "output_fingerprint": layout.file_digest(root, layout.STUFF_HEAD)}


def _backbone_dim(cfg: U2SegConfig) -> int:
    """Token width of ``extract.backbone`` (built on the meta device: no weights, no compute)."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(cfg.extract.backbone, pretrained=False, num_classes=0)
    return int(model.num_features)
