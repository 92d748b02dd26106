"""The run-root layout: every path a stage writes or reads, and the small readers shared by all stages.

One vocabulary so the layout can change in one place (``docs/run-root.md`` describes it for users);
``schemas.py`` beside it declares the Parquet columns. Stages, viz and evaluation name run-root paths
only through this module.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import re
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from u2seg.io.runroot import RunRoot

CONFIG = "config.yaml"
LEASE = "_LEASE"  # one driver per run root: owner token, heartbeat, expiry (u2seg.pipeline.lease)

# manifest: parts of listed images, and the links that could not be followed
MANIFEST = "manifest"
MANIFEST_ERRORS = "manifest/errors"

# stuff: the trained (or loaded) STEGO head with its cluster probe
STUFF = "stuff"
STUFF_HEAD = "stuff/head.pt"
STUFF_TENSORBOARD = "stuff/tensorboard"  # TensorBoard event files of the head's training (rank 0)

# extract: the ledger part (one row per input image, ok or error) is committed last for its group, so
# an image is done iff it is in the ledger; the other tables' parts share the ledger part's name.
LEDGER = "extract/images"
MASKS = "extract/masks"
PATCHES = "extract/patches"
ERRORS = "extract/errors"
EXTRACT_TABLES = (MASKS, PATCHES, ERRORS)

# cluster
THINGS_CENTROIDS = "cluster/things.npy"
STUFF_CENTROIDS = "cluster/stuff.npy"
ASSIGNMENTS = "cluster/assignments"
CLUSTER_SIZES = "cluster/sizes.json"
CLUSTER_FIT = "cluster/fit.json"  # class counts, the classes' digest and k-means stats, written after the centroids

# label sets (see u2seg/io/labelset.py for the format)
LABELS = "labels"

# train / self-training / predict / evaluate
TRAIN = "train"
SELFTRAIN = "selftrain"
PREDICT = "predict"
PREDICT_INPUTS = "predict/inputs"  # the held-out images (evaluate.images), listed like a manifest
EVAL_LABELS = "eval/labels"
EVAL_MODEL = "eval/model"
MODEL_FILE = "model.pt"

# few-shot fine-tuning: one folder per (init, fraction), each a stage folder of its own
FINETUNE = "finetune"
FINETUNE_INITS = ("u2seg", "backbone")

# markers, written by the stage runner in each stage's own folder
SUCCESS = "_SUCCESS"
STARTED = "_STARTED"
STATS = "stats.json"
# rewritten by the driver every run.progress_every_s while a stage's long loop runs (u2seg/pipeline/progress.py)
PROGRESS = "_PROGRESS.json"

_ROUND = re.compile(r"^round-(\d+)$")


def part(folder: str, name: str) -> str:
    """``folder/name``: one committed part (Parquet file, PNG) of a run-root folder."""
    return posixpath.join(folder, name)


def marker(stage_dir: str, name: str = SUCCESS) -> str:
    return posixpath.join(stage_dir, name)


def kmeans_checkpoint(name: str) -> str:
    """Per-iteration k-means state of ``things`` / ``stuff`` (a killed cluster stage resumes from it)."""
    return f"cluster/_checkpoints/{name}.npz"


def round_name(r: int) -> str:
    return f"round-{r}"


def train_round(r: int) -> str:
    """Ray Train's storage folder of round ``r`` (checkpoints), plus our metrics and final model."""
    return f"{TRAIN}/{round_name(r)}"


def selftrain_round(r: int) -> str:
    """What self-training makes before training round ``r >= 1``: its predictions and merged labels."""
    return f"{SELFTRAIN}/{round_name(r)}"


def trained_model(run: str) -> str:
    """The final model of a training run folder (a round, a fine-tuning), for predict."""
    return f"{run}/{MODEL_FILE}"


def training_metrics(run: str) -> str:
    """The per-step curve of a training run folder (JSON lines, rank 0's and every rank's steps)."""
    return f"{run}/metrics.jsonl"


def training_tensorboard(run: str) -> str:
    """TensorBoard event files of a training run folder (rank 0's scalars, copied at each checkpoint)."""
    return f"{run}/tensorboard"


def round_model(r: int) -> str:
    return trained_model(train_round(r))


def round_metrics(r: int) -> str:
    return training_metrics(train_round(r))


def round_tensorboard(r: int) -> str:
    """TensorBoard event files of round ``r``'s training."""
    return training_tensorboard(train_round(r))


def round_labels(r: int) -> str:
    """The label set round ``r`` trains on: the pseudo-labels for round 0, then self-training's merge."""
    return LABELS if r == 0 else f"{selftrain_round(r)}/labels"


def eval_metrics(folder: str) -> str:
    """An evaluation's metrics (one block per protocol) in ``folder`` (``EVAL_LABELS``, ``EVAL_MODEL``, ...)."""
    return f"{folder}/metrics.json"


def eval_mapping(folder: str) -> str:
    """An evaluation's cluster -> category mapping per protocol."""
    return f"{folder}/mapping.json"


def eval_report(folder: str) -> str:
    """An evaluation's static HTML report."""
    return f"{folder}/report.html"


def round_predictions(r: int) -> str:
    """Predictions of round ``r``'s model on the training images, from which round ``r + 1``'s labels are made."""
    return f"{selftrain_round(r + 1)}/predictions"


def finetune_dir(init: str, fraction: float) -> str:
    """``finetune/<init>-<fraction>``: one fine-tuning run (its markers, labels, model, predictions, scores)."""
    if init not in FINETUNE_INITS:
        raise ValueError(f"finetune init must be one of {FINETUNE_INITS}, got {init!r}")
    return f"{FINETUNE}/{init}-{fraction:g}"


def finetune_init(folder: str) -> str:
    """The init of a :func:`finetune_dir` folder (``finetune/u2seg-0.05`` -> ``u2seg``)."""
    head, _, name = folder.partition("/")
    init = name.partition("-")[0]
    if head != FINETUNE or init not in FINETUNE_INITS:
        raise ValueError(f"{folder!r} is not a fine-tuning folder ({FINETUNE}/<init>-<fraction>)")
    return init


def finetune_labels(folder: str) -> str:
    """The labeled subset the run trains on, a label set with the real categories."""
    return f"{folder}/labels"


def finetune_categories(folder: str) -> str:
    """The real categories in the model's order and the model -> ground-truth id map."""
    return f"{folder}/categories.json"


def finetune_subset(folder: str) -> str:
    """Which labeled images the fraction selected (file names, seed, counts)."""
    return f"{folder}/subset.json"


def finetune_train(folder: str) -> str:
    """Ray Train's storage folder of the run (checkpoints), with metrics.jsonl, tensorboard/ and model.pt."""
    return f"{folder}/{TRAIN}"


def finetune_model(folder: str) -> str:
    return trained_model(finetune_train(folder))


def finetune_predict(folder: str) -> str:
    """The fine-tuned model's predictions on the held-out images (a label set + ledger/)."""
    return f"{folder}/{PREDICT}"


def finetune_predict_inputs(folder: str) -> str:
    """The held-out images (evaluate.images), listed like a manifest."""
    return f"{finetune_predict(folder)}/inputs"


def finetune_eval(folder: str) -> str:
    """metrics.json, mapping.json and report.html of the identity-mapped evaluation."""
    return f"{folder}/eval"


def group_name(image_ids: Iterable[str]) -> str:
    """Deterministic name of a group of images: a retried or rerun group overwrites, never duplicates."""
    return "part-" + hashlib.sha1("\n".join(sorted(image_ids)).encode()).hexdigest()[:20] + ".parquet"


def group_stem(name: str) -> str:
    """``part-abc.parquet`` -> ``part-abc`` (label parts and PNG folders are named after the group)."""
    return name[: -len(".parquet")] if name.endswith(".parquet") else name


# ----------------------------------------------------------------------------- small shared readers


def count_rows(root: RunRoot, folder: str) -> int:
    """Rows of every committed Parquet part of ``folder``, from the footers only (no data read)."""
    n = 0
    for path in root.parquet_paths(folder):
        with root.fs.open(path, "rb") as fh:
            n += pq.ParquetFile(fh).metadata.num_rows
    return n


def read_part(root: RunRoot, rel: str, columns: Sequence[str] | None = None,
              image_ids: Iterable[str] | None = None) -> pa.Table | None:
    """One Parquet part (projected; only the rows of ``image_ids`` when given), or None when absent."""
    if not root.exists(rel):
        return None
    table = root.read_part(rel, list(columns) if columns else None)
    if image_ids is not None:
        table = table.filter(pc.is_in(table.column("image_id"), pa.array(sorted(set(image_ids)), pa.string())))
    return table


def subdirs(root: RunRoot, rel: str = "") -> list[str]:
    """Names of the folders directly under ``rel`` (one listing; never a recursive walk of a big run)."""
    try:
        root.fs.invalidate_cache(root.path(rel))
        entries = root.fs.ls(root.path(rel), detail=True)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory")


def rounds_with(root: RunRoot, folder: str, marker_file: str | None = None) -> list[int]:
    """Round numbers ``R`` with a folder ``folder/round-R`` (holding ``marker_file`` when given), ascending."""
    out = []
    for name in subdirs(root, folder):
        m = _ROUND.match(name)
        if m and (marker_file is None or root.exists(folder, name, marker_file)):
            out.append(int(m.group(1)))
    return sorted(out)


def latest_round(root: RunRoot) -> int:
    """Highest training round whose final model exists, or -1 when none has finished."""
    done = rounds_with(root, TRAIN, MODEL_FILE)
    return done[-1] if done else -1


def id_array(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """16-character image ids as a numpy ``S16`` array (16 bytes per image, no Python objects)."""
    if len(column) == 0:
        return np.zeros(0, dtype="S16")
    fixed = column.cast(pa.binary(16))
    fixed = fixed.combine_chunks() if isinstance(fixed, pa.ChunkedArray) else fixed
    return np.frombuffer(fixed.buffers()[1], dtype="S16")[fixed.offset: fixed.offset + len(fixed)].copy()


def save_npy(root: RunRoot, rel: str, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)
    root.write_bytes(rel, buf.getvalue())


def load_npy(root: RunRoot, rel: str) -> np.ndarray:
    return np.load(io.BytesIO(root.read_bytes(rel)))


def class_counts(root: RunRoot) -> tuple[int, int]:
    """(k_things, k_stuff) of a clustered run, as the cluster stage recorded them in ``cluster/fit.json``."""
    if not root.exists(CLUSTER_FIT):
        raise FileNotFoundError(f"{root.join(CLUSTER_FIT)} is missing: run `u2seg cluster` first")
    fit = root.read_json(CLUSTER_FIT)
    return int(fit["k_things"]), int(fit["k_stuff"])


def classes_digest(root: RunRoot) -> str:
    """The identity of the pseudo classes (thing centroids and the stuff model): label records it per group,
    so a refit relabels every group and an unchanged fit keeps them."""
    return str(root.read_json(CLUSTER_FIT)["classes"])


def file_digest(root: RunRoot, *rels: str) -> str:
    h = hashlib.sha1()
    for rel in rels:
        h.update(root.read_bytes(rel))
    return h.hexdigest()[:16]
