"""Loading and plotting helpers for notebooks/explore_run.ipynb: a look inside one run root.

Why a module and not notebook code: the notebook stays a short list of calls that can be executed
headless in tests, and every reader here is bounded (a few sampled images, a few Parquet parts, one
JSON file at a time) so opening a run of millions of images costs the same as opening a tiny one.
Images are sampled from the extract ledger (one Parquet part) and their labels read from their group's
PNGs, never from a whole label set.

Plots are drawn on bare ``matplotlib.figure.Figure`` objects (no pyplot, so no backend or inline
magic is involved) and returned as :class:`Png`; tables are :class:`Table` (HTML, Markdown and plain
text, no pandas). Jupyter displays both through their ``_repr_*_`` methods. matplotlib is a dev extra,
so it is imported inside the plotting functions only.
"""

from __future__ import annotations

import html
import io
import json
import logging
import posixpath
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from u2seg.evaluate.summary import HEADLINE_ROWS, dig, protocol_blocks
from u2seg.io import RunRoot, layout
from u2seg.io.images import ImageDecodeError
from u2seg.io.inputs import InputUnreachableError, read_image
from u2seg.io.layout import read_part
from u2seg.labels import decode_mask, decode_panoptic_png, decode_semantic_png, pseudo_categories
from u2seg.pipeline.stages import STAGES, stage

log = logging.getLogger(__name__)

MAX_SAMPLE = 64  # beyond this a figure is unreadable anyway; keeps "sample a few" a promise
DPI = 80


# ----------------------------------------------------------------------------- display objects


@dataclass(frozen=True)
class Png:
    """A rendered figure; Jupyter shows it as image/png whatever the matplotlib backend."""

    data: bytes
    title: str = ""

    def _repr_png_(self) -> bytes:
        return self.data

    def __repr__(self) -> str:
        return f"<Png {self.title!r}: {len(self.data)} bytes>"

    def save(self, path: str) -> None:
        with open(path, "wb") as fh:
            fh.write(self.data)


@dataclass(frozen=True)
class Note:
    """A one-line message shown instead of a plot when the run has nothing to show yet."""

    text: str

    def _repr_markdown_(self) -> str:
        return f"*{_md_escape(self.text)}*"

    def _repr_html_(self) -> str:
        return f"<p><em>{html.escape(self.text)}</em></p>"

    def __repr__(self) -> str:
        return self.text


@dataclass
class Table:
    """A small table rendered without pandas: HTML for Jupyter, Markdown for text exports, plain text."""

    columns: list[str]
    rows: list[list[Any]]
    title: str = ""
    notes: list[str] = field(default_factory=list)

    def cells(self) -> list[list[str]]:
        return [[_fmt_cell(v) for v in row] for row in self.rows]

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>"
                       for row in self.cells())
        title = f"<h4>{html.escape(self.title)}</h4>" if self.title else ""
        notes = "".join(f"<p><small>{html.escape(n)}</small></p>" for n in self.notes)
        return (f"{title}<table class='u2seg'><thead><tr>{head}</tr></thead>"
                f"<tbody>{body}</tbody></table>{notes}")

    def _repr_markdown_(self) -> str:
        lines = [f"**{_md_escape(self.title)}**", ""] if self.title else []
        lines.append("| " + " | ".join(_md_escape(c) for c in self.columns) + " |")
        lines.append("|" + "---|" * len(self.columns))
        lines += ["| " + " | ".join(_md_escape(v) for v in row) + " |" for row in self.cells()]
        lines += ["", *[_md_escape(n) for n in self.notes]] if self.notes else []
        return "\n".join(lines)

    def __repr__(self) -> str:
        cells = [list(self.columns), *self.cells()]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.columns))]
        text = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
        text.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(([self.title] if self.title else []) + text + self.notes)


def _fmt_cell(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# ----------------------------------------------------------------------------- reading


def open_run(uri: str, storage_options: dict[str, Any] | str | None = None) -> RunRoot:
    """The run root at ``uri``; ``storage_options`` may be a dict or its JSON text (as env vars give it)."""
    if isinstance(storage_options, str):
        storage_options = json.loads(storage_options) if storage_options.strip() else {}
    root = RunRoot(uri, storage_options or {})
    if not root.fs.exists(root.path()):
        raise FileNotFoundError(f"run root {root.uri} does not exist")
    return root


def read_json_if(root: RunRoot, rel: str) -> Any | None:
    """``rel`` parsed, or None when the stage that writes it has not run."""
    return root.read_json(rel) if root.exists(rel) else None


def sample_images(root: RunRoot, n: int = 4, *, seed: int = 0) -> list[dict[str, Any]]:
    """Up to ``n`` successfully extracted images, drawn from as few ledger parts as possible.

    Each row: image_id, uri, width, height, n_masks and ``part`` (the extract group name that its
    masks and cluster assignments share).
    """
    n = max(0, min(int(n), MAX_SAMPLE))
    parts = root.list(layout.LEDGER, ".parquet")
    rng = random.Random(seed)
    rng.shuffle(parts)
    chosen: list[dict[str, Any]] = []
    for name in parts:
        if len(chosen) >= n:
            break
        table = read_part(root, layout.part(layout.LEDGER, name),
                          ["image_id", "uri", "status", "width", "height", "n_masks"])
        rows = [r for r in table.to_pylist() if r["status"] == "ok"]
        rng.shuffle(rows)
        chosen += [{**r, "part": name} for r in rows[: n - len(chosen)]]
    return sorted(chosen, key=lambda r: r["uri"])


def load_image(uri: str, storage_options: dict[str, Any] | None = None, retry_s: float = 30.0) -> np.ndarray:
    """A source image (local path or URI) as uint8 RGB, oriented as extract saw it; a storage blip is
    waited out for ``retry_s`` seconds."""
    return read_image(uri, storage_options, retry_s)


def _try_load(uri: str, storage_options: dict[str, Any] | None) -> np.ndarray | None:
    try:
        return load_image(uri, storage_options)
    except (OSError, ImageDecodeError, InputUnreachableError) as exc:
        log.warning("cannot show %s: %s: %s", uri, type(exc).__name__, exc)
        return None


def image_masks(root: RunRoot, sample: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The MaskCut masks of the sampled images (by image id), each with its thing ``cluster_id`` (or None)."""
    by_part: dict[str, set[str]] = {}
    for r in sample:
        by_part.setdefault(r["part"], set()).add(r["image_id"])
    out: dict[str, list[dict[str, Any]]] = {r["image_id"]: [] for r in sample}
    for part, ids in by_part.items():
        masks = read_part(root, layout.part(layout.MASKS, part), ["image_id", "mask_id", "rle", "bbox", "score"], ids)
        assigned = read_part(root, layout.part(layout.ASSIGNMENTS, part), ["image_id", "mask_id", "cluster_id"], ids)
        classes = {(a["image_id"], a["mask_id"]): a["cluster_id"] for a in assigned.to_pylist()} \
            if assigned is not None else {}
        for m in masks.to_pylist() if masks is not None else []:
            m["cluster_id"] = classes.get((m["image_id"], m["mask_id"]))
            out[m["image_id"]].append(m)
    for ms in out.values():
        ms.sort(key=lambda m: m["mask_id"])
    return out


def class_counts(root: RunRoot) -> tuple[int, int]:
    """(k_things, k_stuff) as clustered: lengths of cluster/sizes.json, else the label stage's stats."""
    sizes = read_json_if(root, layout.CLUSTER_SIZES)
    if sizes:
        return len(sizes.get("things", [])), len(sizes.get("stuff", []))
    stats = read_json_if(root, layout.marker(layout.LABELS, layout.STATS)) or {}
    return int(stats.get("k_things", 0)), int(stats.get("k_stuff", 0))


def category_names(root: RunRoot) -> dict[int, str]:
    """Pseudo category id -> ``thing_3`` style name, with the gt class it was mapped to when evaluated."""
    k_things, k_stuff = class_counts(root)
    names = {c["id"]: c["name"] for c in pseudo_categories(k_things, k_stuff)}
    mapping = read_json_if(root, layout.eval_mapping(layout.EVAL_LABELS)) or {}
    if "protocols" in mapping:  # the first (leading) protocol's mapping names the classes
        mapping = next(iter(mapping["protocols"].values()), {})
    for cid, gt_name in (mapping.get("mapped_names") or {}).items():
        if int(cid) in names:
            names[int(cid)] = f"{names[int(cid)]} → {gt_name}"
    return names


def color_table(root: RunRoot) -> np.ndarray:
    """uint8 [K + 2, 3] colours by category id: 0 = void (black), 1..K the run's classes, last = unknown.

    Index it through :func:`colorize`, which sends ids past the run's classes to the grey last row.
    """
    k_things, k_stuff = class_counts(root)
    cats = pseudo_categories(k_things, k_stuff)
    lut = np.full((len(cats) + 2, 3), 128, np.uint8)
    lut[0] = 0
    for c in cats:
        lut[c["id"]] = c["color"]
    return lut


def colorize(lut: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """RGB image of a category-id map (ids past the table are grey)."""
    return lut[np.minimum(ids, len(lut) - 1)]


def _thing_color(lut: np.ndarray, cluster_id: int | None) -> np.ndarray:
    if cluster_id is None:
        return np.array([255, 255, 255], np.uint8)
    return lut[min(cluster_id + 1, len(lut) - 1)]


def _label_png(root: RunRoot, kind: str, part: str, image_id: str) -> np.ndarray | None:
    """A sampled image's label PNG (``part``: its extract ledger part, whose stem names its label group)."""
    rel = f"{layout.LABELS}/{kind}/{layout.group_stem(part)}/{image_id}.png"
    if not root.exists(rel):
        return None
    data = root.read_bytes(rel)
    return decode_semantic_png(data) if kind == "semantic" else decode_panoptic_png(data)


# ----------------------------------------------------------------------------- pixels


def _scale(shape: tuple[int, ...], max_side: int) -> float:
    return min(1.0, max_side / max(shape[:2]))


def _resize(arr: np.ndarray, scale: float, nearest: bool = False) -> np.ndarray:
    """Downscale by ``scale`` (never up): area-averaged for pictures, nearest (exact ids) for label maps."""
    if scale >= 1.0:
        return arr
    h, w = arr.shape[:2]
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if nearest or arr.dtype != np.uint8:
        rows = np.minimum(((np.arange(nh) + 0.5) * h / nh).astype(np.int64), h - 1)
        cols = np.minimum(((np.arange(nw) + 0.5) * w / nw).astype(np.int64), w - 1)
        return arr[rows[:, None], cols[None, :]]
    return cv2.resize(arr, (nw, nh), interpolation=cv2.INTER_AREA)


def boundaries(ids: np.ndarray) -> np.ndarray:
    """True where a pixel's id differs from its right or lower neighbour (segment outlines)."""
    edge = np.zeros(ids.shape, bool)
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    edge[:-1, :] |= ids[:-1, :] != ids[1:, :]
    return edge


def blend(image: np.ndarray, colors: np.ndarray, where: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """``image`` with ``colors`` laid over the pixels of ``where`` at opacity ``alpha``."""
    out = image.astype(np.float32)
    out[where] = (1 - alpha) * out[where] + alpha * colors[where].astype(np.float32)
    return out.round().astype(np.uint8)


def mask_crop(image: np.ndarray, mask: np.ndarray, bbox: Sequence[float], thumb: int = 96,
              pad: float = 0.15) -> np.ndarray:
    """A square thumbnail of one mask: its padded box, pixels outside the mask dimmed."""
    h, w = mask.shape
    x, y, bw, bh = (float(v) for v in bbox)
    m = max(4.0, pad * max(bw, bh))
    x0, y0 = max(0, int(x - m)), max(0, int(y - m))
    x1, y1 = min(w, int(np.ceil(x + bw + m))), min(h, int(np.ceil(y + bh + m)))
    if x1 <= x0 or y1 <= y0:
        return np.zeros((thumb, thumb, 3), np.uint8)
    crop = image[y0:y1, x0:x1].astype(np.float32)
    inside = mask[y0:y1, x0:x1]
    crop[~inside] *= 0.3
    crop = crop.round().astype(np.uint8)
    s = thumb / max(crop.shape[:2])
    crop = cv2.resize(crop, (max(1, round(crop.shape[1] * s)), max(1, round(crop.shape[0] * s))),
                      interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    out = np.zeros((thumb, thumb, 3), np.uint8)
    oy, ox = (thumb - crop.shape[0]) // 2, (thumb - crop.shape[1]) // 2
    out[oy:oy + crop.shape[0], ox:ox + crop.shape[1]] = crop
    return out


# ----------------------------------------------------------------------------- figures


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI)


def _render(fig, title: str) -> Png:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return Png(buf.getvalue(), title)


def _blank(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, color="0.4", wrap=True)
    ax.set_axis_off()


def pseudo_masks(root: RunRoot, sample: Sequence[dict[str, Any]], *, max_side: int = 384) -> Png | Note:
    """Per sampled image: the image, its MaskCut masks coloured by pseudo thing class, its panoptic label."""
    if not sample:
        return Note("no extracted images yet: run `u2seg extract`")
    masks = image_masks(root, sample)
    lut = color_table(root)
    names = category_names(root)
    fig = _figure(11, 3.6 * len(sample))
    axes = fig.subplots(len(sample), 3, squeeze=False)
    for row, rec in zip(axes, sample, strict=True):
        image = _try_load(rec["uri"], root.storage_options)
        name = posixpath.basename(rec["uri"])
        if image is None:
            for ax in row:
                _blank(ax, f"{name}: source image unreadable")
            continue
        s = _scale(image.shape, max_side)
        small = _resize(image, s)
        row[0].imshow(small)
        row[0].set_title(f"{name} ({rec['width']}x{rec['height']})", fontsize=9)
        overlay, labels = small.copy(), []
        for m in masks[rec["image_id"]]:
            mk = _resize(decode_mask(m["rle"]), s, nearest=True)
            color = np.broadcast_to(_thing_color(lut, m["cluster_id"]), overlay.shape)
            overlay = blend(overlay, color, mk)
            overlay[boundaries(mk.astype(np.uint8)) & mk] = _thing_color(lut, m["cluster_id"])
            x, y = m["bbox"][0] * s, m["bbox"][1] * s
            cls = "unassigned" if m["cluster_id"] is None else names.get(m["cluster_id"] + 1, "?")
            labels.append((x, y, f"{cls} ({m['score']:.2f})"))
        row[1].imshow(overlay)
        for x, y, text in labels:
            row[1].text(x, y, text, fontsize=7, color="white", va="top",
                        bbox={"facecolor": "black", "alpha": 0.6, "pad": 1, "linewidth": 0})
        row[1].set_title(f"MaskCut pseudo-masks: {len(labels)}", fontsize=9)
        sem = _label_png(root, "semantic", rec["part"], rec["image_id"])
        pan = _label_png(root, "panoptic", rec["part"], rec["image_id"])
        if sem is None or pan is None:
            _blank(row[2], "not labelled yet (or label.write_semantic is off)")
        else:
            sem_s, pan_s = _resize(sem, s, nearest=True), _resize(pan, s, nearest=True)
            lab = blend(small, colorize(lut, sem_s), sem_s > 0, alpha=0.6)
            lab[boundaries(pan_s)] = 255
            row[2].imshow(lab)
            n_segments = len(np.unique(pan[pan > 0]))
            row[2].set_title(f"panoptic pseudo-label: {n_segments} segments", fontsize=9)
        for ax in row:
            ax.set_axis_off()
    fig.tight_layout()
    return _render(fig, "pseudo-masks")


def stuff_maps(root: RunRoot, sample: Sequence[dict[str, Any]], *, max_side: int = 256,
               cols: int = 4) -> Png | Note:
    """The semantic pseudo-label of each sampled image, stuff classes coloured, things grey, void black."""
    k_things, _ = class_counts(root)
    shown = [(r, _label_png(root, "semantic", r["part"], r["image_id"])) for r in sample]
    shown = [(r, sem) for r, sem in shown if sem is not None]
    if not shown:
        return Note("no semantic pseudo-labels yet: run `u2seg label` (with label.write_semantic on)")
    names = category_names(root)
    cols = max(1, min(cols, len(shown)))
    rows = -(-len(shown) // cols)
    fig = _figure(3.2 * cols + 2.5, 3.2 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    lut = color_table(root)
    present: set[int] = set()
    for ax, (rec, sem) in zip(axes, shown, strict=False):
        small = _resize(sem, _scale(sem.shape, max_side), nearest=True)
        rgb = colorize(lut, small)
        rgb[(small > 0) & (small <= k_things)] = 200
        present |= {int(c) for c in np.unique(small) if c > k_things}
        ax.imshow(rgb)
        ax.set_title(posixpath.basename(rec["uri"]), fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    from matplotlib.patches import Patch

    handles = [Patch(color=colorize(lut, np.asarray(c)) / 255.0, label=names.get(c, f"category {c}"))
               for c in sorted(present)]
    handles.append(Patch(color=(200 / 255,) * 3, label="things"))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    return _render(fig, "stuff maps")


def gallery_members(root: RunRoot, n_classes: int = 6, n_members: int = 6, *, max_parts: int = 4,
                    seed: int = 0) -> list[tuple[int, int, list[dict[str, Any]]]]:
    """[(cluster_id, size, members)] for the largest thing clusters, members nearest their centroid.

    Only ``max_parts`` assignment parts are scanned, so "nearest" means nearest among those.
    Each member: image_id, mask_id, distance, part.
    """
    sizes = (read_json_if(root, layout.CLUSTER_SIZES) or {}).get("things") or []
    order = [int(c) for c in np.argsort(-np.asarray(sizes, np.int64), kind="stable") if sizes[c] > 0]
    top = order[:n_classes]
    if not top:
        return []
    parts = root.list(layout.ASSIGNMENTS, ".parquet")
    random.Random(seed).shuffle(parts)
    found: dict[int, list[dict[str, Any]]] = {c: [] for c in top}
    wanted = pa.array(top, pa.int32())
    for name in parts[:max_parts]:
        table = read_part(root, layout.part(layout.ASSIGNMENTS, name),
                          ["image_id", "mask_id", "cluster_id", "distance"])
        table = table.filter(pc.is_in(table.column("cluster_id"), wanted))
        for r in table.to_pylist():
            found[r["cluster_id"]].append({**r, "part": name})
    out = []
    for c in top:
        members = sorted(found[c], key=lambda r: (r["distance"], r["image_id"], r["mask_id"]))[:n_members]
        out.append((c, int(sizes[c]), members))
    return out


def thing_gallery(root: RunRoot, n_classes: int = 6, n_members: int = 6, *, thumb: int = 96,
                  max_parts: int = 4, seed: int = 0) -> Png | Note:
    """A few members of each of the largest pseudo thing classes: does a class look like one thing?"""
    groups = gallery_members(root, n_classes, n_members, max_parts=max_parts, seed=seed)
    if not groups:
        return Note("no thing clusters yet: run `u2seg cluster`")
    wanted: dict[str, set[str]] = {}
    for _, _, members in groups:
        for m in members:
            wanted.setdefault(m["part"], set()).add(m["image_id"])
    rles: dict[tuple[str, int], dict[str, Any]] = {}
    uris: dict[str, str] = {}
    for part, ids in wanted.items():
        masks = read_part(root, layout.part(layout.MASKS, part), ["image_id", "mask_id", "rle", "bbox"], ids)
        ledger = read_part(root, layout.part(layout.LEDGER, part), ["image_id", "uri"], ids)
        for m in masks.to_pylist() if masks is not None else []:
            rles[(m["image_id"], m["mask_id"])] = m
        for r in ledger.to_pylist() if ledger is not None else []:
            uris[r["image_id"]] = r["uri"]
    # One decode per source image, whatever the number of its masks in the gallery.
    thumbs: dict[tuple[str, int], np.ndarray] = {}
    by_uri: dict[str, list[tuple[str, int]]] = {}
    for key in rles:
        if key[0] in uris:
            by_uri.setdefault(uris[key[0]], []).append(key)
    for uri, keys in sorted(by_uri.items()):
        image = _try_load(uri, root.storage_options)
        if image is None:
            continue
        for key in keys:
            m = rles[key]
            thumbs[key] = mask_crop(image, decode_mask(m["rle"]), m["bbox"], thumb)
    names = category_names(root)
    n_members = max(1, max(len(members) for _, _, members in groups))
    fig = _figure(1.3 * n_members + 1.8, 1.35 * len(groups))
    axes = fig.subplots(len(groups), n_members, squeeze=False)
    for row, (c, size, members) in zip(axes, groups, strict=True):
        for j, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            key = (members[j]["image_id"], members[j]["mask_id"]) if j < len(members) else None
            if key is not None and key in thumbs:
                ax.imshow(thumbs[key])
            else:
                for spine in ax.spines.values():
                    spine.set_visible(False)
        label = f"{names.get(c + 1, f'thing_{c}')}\n{size} mask{'s' * (size != 1)}"
        row[0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(f"largest {len(groups)} pseudo thing classes, members nearest the centroid", fontsize=10)
    fig.tight_layout()
    return _render(fig, "thing gallery")


def cluster_size_histogram(root: RunRoot) -> Png | Note:
    """How many masks (things) or patches (stuff) each cluster got: balanced, or a few giants and dust?"""
    sizes = read_json_if(root, layout.CLUSTER_SIZES)
    if not sizes:
        return Note("no clusters yet: run `u2seg cluster`")
    kinds = [(k, np.asarray(sizes.get(k) or [], np.int64)) for k in ("things", "stuff")]
    kinds = [(k, s) for k, s in kinds if s.size]
    if not kinds:
        return Note("cluster/sizes.json holds no clusters")
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    fig = _figure(5.2 * len(kinds), 3.4)
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    for ax, (kind, s) in zip(axes, kinds, strict=True):
        pos = s[s > 0]
        if pos.size:
            edges = np.geomspace(pos.min() * 0.8, pos.max() * 1.25, 26)
            ax.hist(pos, bins=edges, color="#4c72b0")
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("cluster size (members)")
        ax.set_ylabel("clusters")
        median = int(np.median(s))
        ax.set_title(f"{kind}: k={s.size}, empty={int((s == 0).sum())}, "
                     f"min/median/max={int(s.min())}/{median}/{int(s.max())}", fontsize=9)
    fig.tight_layout()
    return _render(fig, "cluster sizes")


def read_training_metrics(root: RunRoot, max_points: int = 5000) -> dict[str, list[dict[str, Any]]]:
    """``{"round-R": [records]}`` from train/round-*/metrics.jsonl, each thinned to ``max_points`` records."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in layout.rounds_with(root, layout.TRAIN):
        rnd, path = layout.round_name(r), layout.round_metrics(r)
        if not root.exists(path):
            continue
        records = []
        for line in root.read_text(path).splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # the last line of a log still being written
                log.warning("%s: skipped a malformed line", path)
                continue
            if isinstance(rec, dict) and "step" in rec:
                records.append(rec)
        if len(records) > max_points:
            records = records[:: -(-len(records) // max_points)]
        if records:
            out[rnd] = records
    return out


def training_curves(root: RunRoot, *, max_keys: int = 6, max_points: int = 5000) -> Png | Note:
    """Loss (and the other logged scalars) against step, one line per self-training round."""
    rounds = read_training_metrics(root, max_points)
    if not rounds:
        return Note("no training yet: train/round-*/metrics.jsonl not found")
    keys: list[str] = []
    for records in rounds.values():
        for rec in records:
            for k, v in rec.items():
                if k != "step" and k not in keys and isinstance(v, int | float) and not isinstance(v, bool):
                    keys.append(k)
    keys = sorted(keys, key=lambda k: (k != "loss", not k.startswith("loss"), k))[:max_keys]
    cols = min(3, len(keys))
    nrows = -(-len(keys) // cols)
    fig = _figure(4.4 * cols, 3.0 * nrows)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, keys, strict=False):
        for rnd, records in rounds.items():
            pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
            if pts:
                x, y = zip(*pts, strict=True)
                ax.plot(x, y, label=rnd, linewidth=1.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in axes[len(keys):]:
        ax.set_axis_off()
    fig.tight_layout()
    return _render(fig, "training curves")


# ----------------------------------------------------------------------------- tables

def eval_table(root: RunRoot) -> Table | Note:
    """Pseudo-labels (eval/labels/) and, once trained, the model (eval/model/) side by side, a column per
    (target, evaluation protocol), e.g. ``pseudo-labels/hungarian``; scores in %."""
    sources = [(label, read_json_if(root, layout.eval_metrics(folder)))
               for label, folder in (("pseudo-labels", layout.EVAL_LABELS), ("model", layout.EVAL_MODEL))]
    sources = [(label, m) for label, m in sources if m is not None]
    if not sources:
        return Note("no evaluation yet: run `u2seg evaluate` with a labeled set")
    columns = [(f"{label}/{protocol}", m, block) for label, m in sources
               for protocol, block in protocol_blocks(m).items()]
    rows = [["images evaluated", *[dig(m, ("images", "evaluated")) for _, m, _ in columns]]]
    for label, path, pct in HEADLINE_ROWS:
        values = [dig(block, path) for _, _, block in columns]
        if all(v is None for v in values):
            continue
        rows.append([label, *[f"{100 * v:.1f}" if pct and isinstance(v, int | float) else v
                              for v in values]])
    gt = dig(sources[0][1], ("summary", "ground_truth"))
    notes = [f"ground truth: {gt}; a column per (target, protocol); scores in %"] if gt else []
    return Table(["metric", *[name for name, _, _ in columns]], rows, "evaluation", notes)


def _flatten(stats: dict[str, Any], prefix: str = "", depth: int = 2) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in stats.items():
        if isinstance(v, dict) and depth > 1:
            out += _flatten(v, f"{prefix}{k}.", depth - 1)
        elif isinstance(v, bool | int | float | str) or v is None:
            out.append((prefix + k, v))
    return out


def stage_table(root: RunRoot, *, max_details: int = 10) -> Table | Note:
    """One row per stage that wrote stats.json: done or not, wall time, config hash, its main numbers."""
    stages = [st for st in STAGES if root.exists(st.marker(layout.STATS))]
    if not stages:
        return Note(f"no stage has run in {root.uri} yet")
    rows = []
    for st in stages:
        stats = read_json_if(root, st.marker(layout.STATS)) or {}
        details = [(k, v) for k, v in _flatten(stats)
                   if k not in ("stage", "config_hash", "wall_s", "skipped") and "timings" not in k]
        text = "; ".join(f"{k}={_fmt_cell(v)}" for k, v in details[:max_details])
        if len(details) > max_details:
            text += f"; … (+{len(details) - max_details})"
        rows.append([st.name, "done" if root.exists(st.marker()) else "incomplete",
                     stats.get("wall_s"), stats.get("config_hash"), text])
    return Table(["stage", "status", "wall s", "config hash", "details"], rows, "stages")


def error_table(root: RunRoot, *, max_parts: int = 16) -> Table | Note:
    """Extract errors by class with one example each (from at most ``max_parts`` error parts)."""
    parts = root.list(layout.ERRORS, ".parquet")
    counts: dict[str, list[Any]] = {}
    for name in parts[:max_parts]:
        table = read_part(root, layout.part(layout.ERRORS, name), ["uri", "error_class", "message"])
        for r in table.to_pylist():
            entry = counts.setdefault(r["error_class"], [0, r["uri"], r["message"]])
            entry[0] += 1
    if not counts:
        return Note("no extract errors" if parts or root.exists(stage("extract").marker())
                    else "extract has not run yet")
    rows = [[cls, n, uri, (msg or "")[:120]] for cls, (n, uri, msg) in
            sorted(counts.items(), key=lambda kv: (-kv[1][0], kv[0]))]
    notes = [f"read {max_parts} of {len(parts)} error parts"] if len(parts) > max_parts else []
    return Table(["error class", "images", "example", "message"], rows, "extract errors", notes)
