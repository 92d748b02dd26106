"""notebooks/explore_run.ipynb executed headless on a tiny run built by the real pipeline stages.

The run (manifest, extract, cluster, label, evaluate on 6 synthetic images) is built once per module;
the notebook must run without a cell error and show its figures (image/png) and the metric table.
The viz helpers are then checked where the notebook alone cannot tell: an S3 run root, training
curves and model metrics once they exist, a run root where nothing has run yet.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid

import cv2
import numpy as np
import pytest

from u2seg import viz
from u2seg.data.synthetic import make_synthetic
from u2seg.io import RunRoot
from u2seg.pipeline.run_stage import run_stage

pytestmark = pytest.mark.e2e

log = logging.getLogger(__name__)

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "..", "notebooks", "explore_run.ipynb")
N_WORLD = 6


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for the pipeline stages, unless the session already joined one."""
    import ray

    started = not ray.is_initialized()
    if started:
        # address="local": a new private instance, never a cluster another test run on this machine started
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, local_ray) -> dict[str, str]:
    from helpers import tiny_config

    base = tmp_path_factory.mktemp("notebook")
    world, run = base / "world", base / "run"
    make_synthetic(str(world), N_WORLD, seed=0, min_size=96, max_size=128)
    cfg = tiny_config(str(run), [str(world / "images")], None,
                      f"evaluate.gt_panoptic_json={world}/gt/panoptic.json",
                      f"evaluate.gt_panoptic_dir={world}/gt/panoptic",
                      f"evaluate.gt_instances_json={world}/gt/instances.json")
    t0 = time.time()
    for stage in ("manifest", "stuff", "extract", "cluster", "label", "evaluate"):
        run_stage(stage, cfg)
    log.info("tiny run built in %.1fs", time.time() - t0)
    return {"run": str(run), "world": str(world)}


def _ensure_python3_kernel() -> None:
    """nbclient needs a 'python3' kernelspec; ipykernel provides it, else install it into this venv."""
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" not in KernelSpecManager().find_kernel_specs():
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3"],
                       check=True, capture_output=True)


def _execute(run_root: str, storage_options: dict, workdir: str, monkeypatch) -> list[dict]:
    import nbformat
    from nbclient import NotebookClient

    _ensure_python3_kernel()
    monkeypatch.setenv("U2SEG_RUN_ROOT", run_root)
    monkeypatch.setenv("U2SEG_STORAGE_OPTIONS", json.dumps(storage_options))
    monkeypatch.setenv("U2SEG_N_IMAGES", "3")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    repo = os.path.abspath(os.path.join(os.path.dirname(NOTEBOOK), ".."))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": workdir}})
    client.execute()
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]


def _pngs(outputs: list[dict]) -> list[np.ndarray]:
    import base64

    images = []
    for out in outputs:
        data = out.get("data", {}).get("image/png")
        if data:
            img = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)
            assert img is not None, "an image/png output does not decode"
            images.append(img)
    return images


def _text(outputs: list[dict], mime: str) -> str:
    return "\n".join(str(out.get("data", {}).get(mime, "")) for out in outputs)


def test_notebook_runs_on_tiny_run(tiny_run, tmp_path, monkeypatch):
    t0 = time.time()
    outputs = _execute(tiny_run["run"], {}, str(tmp_path), monkeypatch)
    log.info("notebook executed in %.1fs", time.time() - t0)
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, errors
    images = _pngs(outputs)
    # pseudo-masks, thing gallery, stuff maps, cluster sizes (no training yet)
    assert len(images) == 4, [o.get("data", {}).keys() for o in outputs]
    assert all(min(img.shape[:2]) > 100 and img.std() > 10 for img in images)  # drawn, not blank
    html = _text(outputs, "text/html")
    assert "<table" in html and ">PQ<" in html and ">mIoU<" in html and ">AP mask<" in html
    assert ">pseudo-labels/hungarian<" in html and ">pseudo-labels/u2seg<" in html and ">model/" not in html
    for stage in ("manifest", "stuff", "extract", "cluster", "label", "evaluate"):
        assert f"<td>{stage}</td><td>done</td>" in html
    assert "no training yet" in _text(outputs, "text/markdown")
    assert "|" in _text(outputs, "text/markdown")  # the tables' Markdown form travels with the HTML


def test_viz_on_s3_root_with_training_and_model_metrics(tiny_run, s3):
    """The same run copied to S3, with a training log and model metrics added, read through s3://."""
    so = s3.storage_options()
    root = RunRoot(s3.uri(f"nb-{uuid.uuid4().hex[:8]}"), so)
    root.fs.put(tiny_run["run"] + "/", root.path() + "/", recursive=True)
    lines = [json.dumps({"step": s, "loss": 3.0 / (s + 1), "loss_mask": 1.0 / (s + 1), "lr": 1e-4})
             for s in range(0, 50, 5)]
    root.write_text("train/round-0/metrics.jsonl", "\n".join(lines) + "\n")
    partial_line = '\n{"step": 20, "lo'  # a log still being written
    root.write_text("train/round-1/metrics.jsonl", "\n".join(lines[:4]) + partial_line)
    metrics = root.read_json("eval/labels/metrics.json")
    for block in metrics["protocols"].values():
        block["panoptic"]["All"]["pq"] = 0.5
    root.write_json("eval/model/metrics.json", metrics)

    opened = viz.open_run(root.uri, json.dumps(so))
    stages = [row[0] for row in viz.stage_table(opened).rows]
    assert stages == ["manifest", "stuff", "extract", "cluster", "label", "evaluate"]
    rounds = viz.read_training_metrics(opened)
    assert list(rounds) == ["round-0", "round-1"]
    assert len(rounds["round-0"]) == 10 and len(rounds["round-1"]) == 4
    assert isinstance(viz.training_curves(opened), viz.Png)

    table = viz.eval_table(opened)
    assert table.columns == ["metric", "pseudo-labels/hungarian", "pseudo-labels/u2seg", "model/hungarian",
                             "model/u2seg"]
    pq_row = next(r for r in table.rows if r[0] == "PQ")
    assert pq_row[3] == pq_row[4] == "50.0" and pq_row[1] != "50.0"

    sample = viz.sample_images(opened, 100)
    assert len(sample) == N_WORLD and viz.sample_images(opened, 2) == viz.sample_images(opened, 2)
    assert len(viz.sample_images(opened, 2)) == 2
    masks = viz.image_masks(opened, sample)
    assert sum(len(m) for m in masks.values()) > 0
    assert all(m["cluster_id"] is not None for ms in masks.values() for m in ms)
    for png in (viz.pseudo_masks(opened, sample[:2]), viz.thing_gallery(opened, 2, 3),
                viz.stuff_maps(opened, sample), viz.cluster_size_histogram(opened)):
        assert isinstance(png, viz.Png) and png.data.startswith(b"\x89PNG")
    groups = viz.gallery_members(opened, 3, 2)
    sizes = RunRoot(tiny_run["run"]).read_json("cluster/sizes.json")["things"]
    assert [size for _, size, _ in groups] == sorted(sizes, reverse=True)[: len(groups)]
    assert all(len(members) <= 2 for _, _, members in groups)


def test_viz_on_empty_and_partial_run_roots(tiny_run, tmp_path):
    """Every view says what is missing instead of failing: nothing run yet, then extract without labels."""
    empty = tmp_path / "empty"
    empty.mkdir()
    root = viz.open_run(str(empty))
    sample = viz.sample_images(root, 4)
    assert sample == []
    for note in (viz.stage_table(root), viz.error_table(root), viz.pseudo_masks(root, sample),
                 viz.thing_gallery(root), viz.stuff_maps(root, sample), viz.cluster_size_histogram(root),
                 viz.training_curves(root), viz.eval_table(root)):
        assert isinstance(note, viz.Note), note
    with pytest.raises(FileNotFoundError):
        viz.open_run(str(tmp_path / "missing"))

    partial = tmp_path / "partial"
    shutil.copytree(os.path.join(tiny_run["run"], "extract"), partial / "extract")
    root = viz.open_run(str(partial))
    sample = viz.sample_images(root, 2)
    assert len(sample) == 2
    assert isinstance(viz.pseudo_masks(root, sample), viz.Png)  # masks unassigned, labels "not labelled yet"
    assert isinstance(viz.stuff_maps(root, sample), viz.Note)
    assert isinstance(viz.stage_table(root), viz.Table)

    table = viz.Table(["a|b", "<c>"], [["x|y", "<script>"], [None, 0.123456]], "t")
    assert "&lt;script&gt;" in table._repr_html_() and "<script>" not in table._repr_html_()
    assert "x\\|y" in table._repr_markdown_() and "—" in table._repr_markdown_() and "0.1235" in repr(table)
