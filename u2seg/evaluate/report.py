"""Self-contained HTML evaluation report: metric tables, per-class bars, overlay grid.

Everything is inline (CSS, base64 PNG images, no script) so the one file opens offline from disk
or straight from object storage.
"""

from __future__ import annotations

import base64
import html
import logging
import os
from collections.abc import Mapping, Sequence
from typing import IO

import cv2
import fsspec
import numpy as np

from u2seg.evaluate.summary import HEADLINE_ROWS, dig

logger = logging.getLogger(__name__)

# metrics shown as percentages; everything else as plain numbers
_FRACTIONS = {"pq", "sq", "rq", "miou", "iou", "pixel_accuracy", "AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100"}
_VOID_RGB = np.array([90, 90, 90], dtype=np.float32)
_OK_RGB = np.array([40, 200, 90], dtype=np.float32)
_BAD_RGB = np.array([235, 40, 40], dtype=np.float32)

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#1d232a;
background:#fafbfc}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde1e6;
padding-bottom:4px} h3{font-size:14px;margin:16px 0 6px;color:#4a5560}
.note{color:#66717c;font-size:12px}
table{border-collapse:collapse;font-size:13px;margin:4px 0 10px;background:#fff}
th,td{border:1px solid #dde1e6;padding:4px 10px;text-align:right} th{background:#eef1f4}
td:first-child,th:first-child{text-align:left}
.bars{display:grid;grid-template-columns:170px 1fr 190px;gap:3px 10px;font-size:12px;align-items:center;
max-width:900px;background:#fff;padding:8px;border:1px solid #dde1e6}
.bar{height:13px;background:#eef1f4;position:relative} .bar>div{height:100%;background:#3b7dd8}
.bar>div.stuff{background:#d8893b} .lbl{white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.num{color:#4a5560;font-variant-numeric:tabular-nums}
.key{display:inline-block;width:10px;height:10px;margin:0 4px 0 10px;vertical-align:middle}
.grid{display:grid;grid-template-columns:repeat(4,minmax(0,300px));gap:6px 8px;justify-content:start}
.grid figure{margin:0;min-width:0} .grid img{display:block;width:100%;height:auto;image-rendering:pixelated;
border:1px solid #c9ced4;box-sizing:border-box}
.grid figcaption{font-size:11px;color:#4a5560;margin-top:2px}
.chip{display:inline-block;padding:0 4px;margin:1px 2px 0 0;border-radius:2px;font-size:10px;
border:1px solid rgba(0,0,0,.25)}
.row-name{grid-column:1/-1;font-size:12px;font-weight:600;margin-top:8px}
"""


# Kelly's / Glasbey-style distinct colours; category ids index it modulo its length
_PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128), (255, 255, 255), (0, 0, 0)], dtype=np.float32)


def category_color(cat_id: int) -> np.ndarray:
    """Stable, distinct RGB colour per category id."""
    return _PALETTE[int(cat_id) % (len(_PALETTE) - 2)]


_DISPLAY = {"pq": "PQ", "sq": "SQ", "rq": "RQ", "n": "N", "miou": "mIoU", "pixel_accuracy": "pixel accuracy",
            "n_classes": "classes"}


def _name(key: object) -> str:
    return html.escape(_DISPLAY.get(str(key), str(key)))


def _fmt(key: str, value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return html.escape(str(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{100 * float(value):.1f}" if key in _FRACTIONS else f"{float(value):.4g}"
    return html.escape(str(value))


def _is_scalar(v: object) -> bool:
    return isinstance(v, (int, float, str, bool, np.integer, np.floating)) or v is None


def _kv_table(d: Mapping) -> str:
    rows = "".join(f"<tr><td>{_name(k)}</td><td>{_fmt(str(k), v)}</td></tr>" for k, v in d.items())
    return f"<table>{rows}</table>"


def _matrix_table(d: Mapping[str, Mapping]) -> str:
    cols: list[str] = []
    for row in d.values():
        cols += [str(k) for k in row if str(k) not in cols]
    head = "<tr><th></th>" + "".join(f"<th>{_name(c)}</th>" for c in cols) + "</tr>"
    body = ""
    for name, row in d.items():
        cells = "".join(f"<td>{_fmt(c, row[c]) if c in row else ''}</td>" for c in cols)
        body += f"<tr><td>{html.escape(str(name))}</td>{cells}</tr>"
    return f"<table>{head}{body}</table>"


def _section(name: str, obj: Mapping, names: Mapping[int, str], things: set[int], depth: int = 0) -> str:
    """Render one metrics dict: scalars, tables of scalar dicts, per-class bars, nested sections."""
    parts = [f"<h{min(2 + depth, 4)}>{html.escape(name)}</h{min(2 + depth, 4)}>"]
    scalars = {k: v for k, v in obj.items() if _is_scalar(v) and k != "per_class"}
    tables = {k: v for k, v in obj.items() if isinstance(v, Mapping) and k not in ("per_class", "diagnostics")
              and v and all(_is_scalar(x) for x in v.values())}
    nested = {k: v for k, v in obj.items() if isinstance(v, Mapping) and k not in tables
              and k not in ("per_class", "diagnostics")}
    if scalars:
        parts.append(_kv_table(scalars))
    if tables:
        parts.append(_matrix_table(tables))
    if isinstance(obj.get("per_class"), Mapping) and obj["per_class"]:
        parts.append(_bars(obj["per_class"], names, things))
    for k, v in nested.items():
        parts.append(_section(str(k), v, names, things, depth + 1))
    if isinstance(obj.get("diagnostics"), Mapping) and obj["diagnostics"]:
        diag = ", ".join(f"{_name(k)}: {_fmt(str(k), v)}" for k, v in obj["diagnostics"].items())
        parts.append(f"<p class='note'>diagnostics — {diag}</p>")
    return "\n".join(parts)


def _bars(per_class: Mapping, names: Mapping[int, str], things: set[int]) -> str:
    """Horizontal CSS bars of per-class PQ (or IoU), best first, things and stuff coloured apart."""
    rows = [(k, v) for k, v in per_class.items() if isinstance(v, Mapping)]
    key = "pq" if rows and "pq" in rows[0][1] else "iou"
    rows.sort(key=lambda kv: (-float(kv[1].get(key, 0.0)), str(kv[0])))
    out = [f"<h3>per-class {key.upper()}</h3><div class='note'>"
           "<span class='key' style='background:#3b7dd8'></span>thing"
           "<span class='key' style='background:#d8893b'></span>stuff</div><div class='bars'>"]
    for cid, v in rows:
        try:
            icid = int(cid)
        except (TypeError, ValueError):
            icid = -1
        label = html.escape(str(names.get(icid, cid)))
        val = float(v.get(key, 0.0))
        kind = "" if (icid in things or not things) else " class='stuff'"
        if key == "pq":
            sq, rq = 100 * float(v.get("sq", 0)), 100 * float(v.get("rq", 0))
            detail = f"{100 * val:.1f} (SQ {sq:.0f} RQ {rq:.0f})"
            if "tp" in v:
                detail += f" · {v['tp']}/{v['fp']}/{v['fn']}"
        else:
            detail = f"{100 * val:.1f}"
        width = 100 * min(max(val, 0.0), 1.0)
        out.append(f"<div class='lbl' title='{label}'>{label}</div>"
                   f"<div class='bar'><div{kind} style='width:{width:.1f}%'></div></div>"
                   f"<div class='num'>{detail}</div>")
    out.append("</div>")
    if key == "pq":
        out.append("<div class='note'>numbers: PQ (SQ RQ) · TP/FP/FN</div>")
    return "".join(out)


# ----------------------------------------------------------------------------- images


def _png_b64(rgb: np.ndarray) -> str:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("PNG encoding failed")
    return base64.b64encode(buf.tobytes()).decode("ascii")


def _colorize(labels: np.ndarray, void_label: int) -> tuple[np.ndarray, np.ndarray]:
    ids, inv = np.unique(labels, return_inverse=True)
    lut = np.stack([category_color(i) for i in ids.tolist()]) if len(ids) else np.zeros((0, 3), np.float32)
    return lut[inv.reshape(labels.shape)], labels != void_label


def _boundaries(labels: np.ndarray) -> np.ndarray:
    b = np.zeros(labels.shape, dtype=bool)
    b[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    b[1:, :] |= labels[1:, :] != labels[:-1, :]
    return b


def overlay(image: np.ndarray, labels: np.ndarray, void_label: int = 0, alpha: float = 0.45) -> np.ndarray:
    """Blend category colours over the image; void pixels stay as a dimmed photo; boundaries dark."""
    img = image.astype(np.float32)
    color, valid = _colorize(labels, void_label)
    out = img * 0.6
    out[valid] = img[valid] * (1 - alpha) + color[valid] * alpha
    out[_boundaries(labels)] = 20
    return np.clip(out, 0, 255).astype(np.uint8)


def error_overlay(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, void_label: int = 0) -> np.ndarray:
    """Red where the (mapped) prediction disagrees with labeled gt, green where it agrees, grey on void."""
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)[..., None].repeat(3, axis=2) * 0.7
    valid = gt != void_label
    wrong = valid & (pred != gt)
    right = valid & ~wrong
    out = gray.copy()
    out[~valid] = gray[~valid] * 0.5 + _VOID_RGB * 0.5
    out[right] = gray[right] * 0.8 + _OK_RGB * 0.2
    out[wrong] = gray[wrong] * 0.2 + _BAD_RGB * 0.8
    return np.clip(out, 0, 255).astype(np.uint8)


def _apply_mapping(pred: np.ndarray, mapping: Mapping[int, int] | None, void_label: int) -> np.ndarray:
    if mapping is None:
        return pred
    mapping = {int(k): int(v) for k, v in mapping.items()}
    ids, inv = np.unique(pred, return_inverse=True)
    lut = np.asarray([int(mapping.get(int(i), void_label)) if i != void_label else void_label
                      for i in ids.tolist()], dtype=np.int64)
    return lut[inv.reshape(pred.shape)]


def _resize(image: np.ndarray, gt: np.ndarray, pred: np.ndarray,
            max_width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    for name, lab in (("gt", gt), ("pred", pred)):
        if lab.shape != (h, w):
            raise ValueError(f"{name} map {lab.shape} does not match image {(h, w)}")
    if w <= max_width:
        return image, gt, pred
    nh, nw = max(1, round(h * max_width / w)), max_width
    small = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)

    def near(a: np.ndarray) -> np.ndarray:
        ys = (np.arange(nh) * h // nh)[:, None]
        xs = (np.arange(nw) * w // nw)[None, :]
        return a[ys, xs]

    return small, near(gt), near(pred)


def _chips(labels: np.ndarray, void_label: int, names: Mapping[int, str], limit: int = 8) -> str:
    ids, cnt = np.unique(labels[labels != void_label], return_counts=True)
    order = np.argsort(-cnt)[:limit]
    chips = []
    for i in ids[order].tolist():
        r, g, b = (int(x) for x in category_color(i))
        ink = "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 150 else "#fff"
        chips.append(f"<span class='chip' style='background:rgb({r},{g},{b});color:{ink}'>"
                     f"{html.escape(str(names.get(int(i), i)))}</span>")
    more = f" +{len(ids) - limit}" if len(ids) > limit else ""
    return "".join(chips) + more


def _sample_block(sample: Mapping, names: Mapping[int, str], mappings: Mapping[str, Mapping[int, int] | None],
                  void_label: int, max_width: int) -> str:
    """One sample row: the image, the gt, then the mapped prediction and its errors under each mapping."""
    image = np.asarray(sample["image"])
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    image = image[..., :3].astype(np.uint8)
    gt = np.asarray(sample["gt"]).astype(np.int64)
    raw = np.asarray(sample["pred"]).astype(np.int64)
    image, gt, raw = _resize(image, gt, raw, max_width)
    valid = gt != void_label
    tiles = [(image, "image"), (overlay(image, gt, void_label), "ground truth " + _chips(gt, void_label, names))]
    for protocol, mapping in mappings.items():
        pred = _apply_mapping(raw, mapping, void_label)
        acc = float((pred[valid] == gt[valid]).mean()) if valid.any() else 0.0
        tag = f"{html.escape(protocol)}: " if protocol else ""
        tiles += [(overlay(image, pred, void_label), f"{tag}prediction " + _chips(pred, void_label, names)),
                  (error_overlay(image, gt, pred, void_label),
                   f"{tag}errors: <b style='color:#c22'>wrong</b> / <b style='color:#1a8a45'>right</b> / grey "
                   f"void · pixel acc {100 * acc:.1f}")]
    name = html.escape(str(sample.get("name", "")))
    h, w = image.shape[:2]
    size = f"width='{w}' height='{h}'"  # CSS scales the tile to its column, keeping the aspect
    figs = "".join(f"<figure><img alt='{name}' {size} src='data:image/png;base64,{_png_b64(t)}'>"
                   f"<figcaption>{cap}</figcaption></figure>" for t, cap in tiles)
    return f"<div class='row-name'>{name}</div>{figs}"


def _side_by_side(blocks: Mapping[str, Mapping], notes: Mapping[str, str]) -> str:
    """The headline numbers of every protocol, a column each."""
    head = "<tr><th>metric</th>" + "".join(f"<th>{html.escape(p)}</th>" for p in blocks) + "</tr>"
    body = ""
    for label, path, pct in HEADLINE_ROWS:
        values = [dig(b, path) for b in blocks.values()]
        if all(v is None for v in values):
            continue
        cells = "".join(f"<td>{_fmt(path[-1] if pct else 'n', v) if v is not None else '—'}</td>"
                        for v in values)
        body += f"<tr><td>{html.escape(label)}</td>{cells}</tr>"
    legend = "".join(f"<li><b>{html.escape(p)}</b>: {html.escape(n)}</li>" for p, n in notes.items() if p in blocks)
    return (f"<h2>protocols side by side</h2><table>{head}{body}</table>"
            + (f"<ul class='note'>{legend}</ul>" if legend else ""))


def _per_class_side_by_side(blocks: Mapping[str, Mapping], names: Mapping[int, str]) -> str:
    """Per gt class PQ (TP/FP/FN) under every protocol, classes any protocol scored, best first."""
    per = {p: (dig(b, ("panoptic", "per_class")) or {}) for p, b in blocks.items()}
    classes: list[str] = []
    for rows in per.values():
        for cid, row in rows.items():
            if isinstance(row, Mapping) and row.get("tp", 0) + row.get("fp", 0) + row.get("fn", 0) > 0 \
                    and str(cid) not in classes:
                classes.append(str(cid))
    if not classes:
        return ""
    first = next(iter(per.values()))

    def row_of(rows: Mapping, cid: str) -> Mapping | None:
        return rows.get(cid, rows.get(int(cid))) if cid.lstrip("-").isdigit() else rows.get(cid)

    classes.sort(key=lambda c: -float((row_of(first, c) or {}).get("pq", 0.0)))
    head = "<tr><th>class</th>" + "".join(f"<th>{html.escape(p)} PQ</th>" for p in per) + "</tr>"
    body = ""
    for cid in classes:
        label = names.get(int(cid), cid) if cid.lstrip("-").isdigit() else cid
        cells = ""
        for rows in per.values():
            r = row_of(rows, cid)
            cells += (f"<td>{100 * float(r.get('pq', 0.0)):.1f} · {r.get('tp', 0)}/{r.get('fp', 0)}/{r.get('fn', 0)}"
                      "</td>" if r else "<td>—</td>")
        body += f"<tr><td>{html.escape(str(label))}</td>{cells}</tr>"
    return ("<h2>per-class PQ side by side</h2><div class='note'>PQ · TP/FP/FN</div>"
            f"<table>{head}{body}</table>")


def render_report(metrics: Mapping, samples: Sequence[Mapping], *, title: str = "u2seg evaluation",
                  category_names: Mapping[int, str] | None = None, thing_ids: Sequence[int] = (),
                  mapping: Mapping[int, int] | None = None,
                  mappings: Mapping[str, Mapping[int, int]] | None = None,
                  protocol_notes: Mapping[str, str] | None = None, void_label: int = 0,
                  max_width: int = 320) -> str:
    """The report as an HTML string (see `write_report`)."""
    names = {int(k): str(v) for k, v in (category_names or {}).items()}
    things = {int(t) for t in thing_ids}
    body = [f"<h1>{html.escape(title)}</h1>",
            "<p class='note'>Scores are percentages (×100) except counts. Pseudo categories were mapped to "
            "ground-truth categories before scoring, by each protocol's own rule.</p>"]
    if isinstance(metrics.get("protocols"), Mapping):
        blocks = metrics["protocols"]
        for k, v in metrics.items():
            if k != "protocols" and isinstance(v, Mapping):
                body.append(_section(str(k), v, names, things))
        body.append(_side_by_side(blocks, protocol_notes or {}))
        body.append(_per_class_side_by_side(blocks, names))
        for p, block in blocks.items():
            body.append(_section(f"protocol: {p}", block, names, things))
    else:
        top = {"metrics": metrics} if "All" in metrics else metrics
        for k, v in top.items():
            if isinstance(v, Mapping):
                body.append(_section(str(k), v, names, things))
            else:
                body.append(_kv_table({k: v}))
    if samples:
        tile_maps: Mapping[str, Mapping[int, int] | None] = mappings if mappings else {"": mapping}
        columns = 2 + 2 * len(tile_maps)
        body.append(f"<h2>samples</h2><div class='grid' style='grid-template-columns:repeat({columns},"
                    "minmax(0,300px))'>")
        body += [_sample_block(s, names, tile_maps, void_label, max_width) for s in samples]
        body.append("</div>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>")


def write_report(metrics: Mapping, samples: Sequence[Mapping],
                 out: str | os.PathLike | IO[bytes] | None = None, *,
                 storage_options: Mapping | None = None, **render_kwargs) -> str:
    """Render the report and write it to a path/URI (fsspec) or binary file object; returns the HTML.

    samples: dicts with "image" (uint8 HxWx3 RGB), "gt" and "pred" (HxW category-id maps; pred in
    pseudo ids when `mapping` is passed, else already in gt ids) and "name".
    render_kwargs: title, category_names {id: name}, thing_ids, mapping, void_label (default 0), max_width;
    with metrics holding one block per protocol under "protocols" (the evaluate stage's metrics.json), the
    protocols are shown side by side, `mappings` {protocol: mapping} gives each sample a prediction and
    an error tile per protocol and `protocol_notes` {protocol: one line} explains each column.
    """
    text = render_report(metrics, samples, **render_kwargs)
    data = text.encode("utf-8")
    if out is None:
        return text
    if hasattr(out, "write"):
        out.write(data)
    else:
        with fsspec.open(os.fspath(out), "wb", **dict(storage_options or {})) as f:
            f.write(data)
    logger.info("wrote evaluation report (%d kB) to %s", len(data) // 1024, out)
    return text
