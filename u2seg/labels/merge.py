"""Assemble one big COCO JSON from per-part fragments, streaming.

Each part is a small COCO piece ({"images": [...], "annotations": [...]}: a label set gives one per
Parquet part, ``u2seg.io.labelset.LabelSet.coco_parts``); the final instances.json / panoptic.json may
hold millions of annotations, so it is written element by
element: one part in memory at a time, two passes (images, then annotations). Only image ids are
remembered (to reject duplicates and dangling annotations), never the annotations themselves.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import IO, Any

PartSource = Callable[[], Iterable[str | bytes | Mapping[str, Any]]] | list | tuple


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _parts(source: PartSource) -> Iterator[Mapping[str, Any]]:
    """A fresh pass over the parts, each parsed to a dict."""
    if callable(source):
        items = source()
    elif isinstance(source, list | tuple):
        items = source
    else:
        raise TypeError("parts must be a callable returning a fresh iterator, or a list/tuple "
                        "(a one-shot iterator cannot be read twice)")
    for item in items:
        part = json.loads(item) if isinstance(item, str | bytes) else item
        if not isinstance(part, Mapping):
            raise ValueError(f"a part must be a JSON object, got {type(part).__name__}")
        yield part


def _text_writer(out: IO) -> Callable[[str], None]:
    """Write str to text or binary file objects alike (fsspec 'wb' files are binary)."""
    try:
        out.write("")
    except TypeError:
        return lambda text: out.write(text.encode("utf-8"))
    return out.write


def merge_coco_parts(
    parts: PartSource,
    header: Mapping[str, Any],
    out: IO,
    *,
    renumber_annotations: bool = True,
) -> dict[str, int]:
    """Stream ``header`` keys (info, categories, ...), then all parts' images, then annotations, to ``out``.

    ``parts`` is a callable returning a fresh iterable of parts (JSON text, bytes or dicts) and is
    called twice. Annotations that carry an "id" (instances) are renumbered 1..N in stream order
    when ``renumber_annotations`` (parts number their ids locally); otherwise duplicate ids raise.
    Panoptic annotations (no "id") pass through untouched: their segment ids are per image.
    Raises ValueError on duplicate image ids or annotations of an image no part lists.
    Returns counts: parts, images, annotations.
    """
    clash = {"images", "annotations"} & set(header)
    if clash:
        raise ValueError(f"header must not contain {sorted(clash)}; they come from the parts")
    write = _text_writer(out)
    write("{")
    for key, value in header.items():
        write(f"{_dumps(str(key))}:{_dumps(value)},")

    write('"images":[')
    image_ids: set[Any] = set()
    n_parts = 0
    for part in _parts(parts):
        n_parts += 1
        for image in part.get("images", []):
            if image["id"] in image_ids:
                raise ValueError(f"image id {image['id']!r} appears in more than one part/entry")
            image_ids.add(image["id"])
            write(("," if len(image_ids) > 1 else "") + _dumps(image))

    write('],"annotations":[')
    n_anns = 0
    seen_ann_ids: set[Any] = set()
    for part in _parts(parts):
        for ann in part.get("annotations", []):
            if ann["image_id"] not in image_ids:
                raise ValueError(f"annotation for unknown image id {ann['image_id']!r}")
            if "id" in ann:
                if renumber_annotations:
                    ann = {**ann, "id": n_anns + 1}
                elif ann["id"] in seen_ann_ids:
                    raise ValueError(f"duplicate annotation id {ann['id']!r}")
                else:
                    seen_ann_ids.add(ann["id"])
            write(("," if n_anns else "") + _dumps(ann))
            n_anns += 1
    write("]}")
    return {"parts": n_parts, "images": len(image_ids), "annotations": n_anns}
