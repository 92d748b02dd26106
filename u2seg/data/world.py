"""A procedural panoptic world: stuff backgrounds with distinct textures, thing shapes painted on top.

Why: tests, demos and benchmarks need images whose panoptic ground truth is exact, cheap to make
and identical on every machine. Everything here is a pure function of a numpy Generator; drawing
is vectorised numpy plus cv2 fills with no anti-aliasing, so the painted pixels *are* the labels.

Rules of the world:
* 1-3 stuff regions per image (wavy horizons or random polygons), one segment per stuff class.
* 1-6 thing instances, each a distinct shape + colour/texture per class, painted in order (later
  occlude earlier); an instance with no visible pixel is dropped; an instance with fewer than
  ``MIN_VISIBLE_AREA`` visible pixels becomes void (label 0), like the unlabeled slivers of COCO.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

MIN_VISIBLE_AREA = 20
"""Visible slivers smaller than this (pixels) are void: too small to name, they only add noise."""


@dataclass(frozen=True)
class Category:
    """One class of the world; ids follow the pipeline's convention (things first, then stuff)."""

    id: int
    name: str
    isthing: bool
    color: tuple[int, int, int]  # base RGB colour, also used as the COCO panoptic display colour

    def to_coco(self) -> dict:
        return {"id": self.id, "name": self.name, "supercategory": "thing" if self.isthing else "stuff",
                "isthing": int(self.isthing), "color": list(self.color)}


THINGS: tuple[Category, ...] = (
    Category(1, "disc", True, (220, 40, 40)),
    Category(2, "striped_square", True, (40, 70, 210)),
    Category(3, "triangle", True, (235, 205, 30)),
    Category(4, "star", True, (170, 60, 210)),
    Category(5, "checkered_ellipse", True, (250, 140, 20)),
    Category(6, "dotted_hexagon", True, (30, 190, 190)),
)
STUFF: tuple[Category, ...] = (
    Category(7, "sky", False, (120, 175, 235)),
    Category(8, "grass", False, (60, 140, 50)),
    Category(9, "water", False, (30, 90, 160)),
    Category(10, "wall", False, (150, 65, 45)),
    Category(11, "sand", False, (215, 190, 140)),
)
CATEGORIES: tuple[Category, ...] = THINGS + STUFF
VOID = 0


@dataclass
class Segment:
    """One panoptic segment: ``id`` is its value in the segment map; instances keep paint order."""

    id: int
    category_id: int
    area: int
    bbox: tuple[int, int, int, int]  # x, y, w, h (inclusive pixel box)


@dataclass
class Scene:
    """A rendered image and its exact panoptic labels."""

    image: np.ndarray  # uint8 H x W x 3 RGB
    segment_map: np.ndarray  # int32 H x W, segment id per pixel, 0 = void
    segments: list[Segment]

    def semantic_map(self) -> np.ndarray:
        """uint8 H x W category id per pixel (0 = void)."""
        lut = np.zeros(max((s.id for s in self.segments), default=0) + 1, np.uint8)
        for seg in self.segments:
            lut[seg.id] = seg.category_id
        return lut[self.segment_map]


# ----------------------------------------------------------------------------- stuff textures


def _jitter(rng: np.random.Generator, color: tuple[int, int, int], amount: float) -> np.ndarray:
    return np.asarray(color, np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32)


def _sky(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    top = _jitter(rng, (90, 150, 230), 12)
    bottom = _jitter(rng, (205, 225, 250), 8)
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    img = np.broadcast_to(top * (1 - t) + bottom * t, (h, w, 3))
    return img + rng.normal(0, 1.5, (h, w, 1)).astype(np.float32)


def _grass(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = _jitter(rng, STUFF[1].color, 10)
    blades = cv2.blur(rng.normal(0, 40, (h, w)).astype(np.float32), (1, 7))  # vertical blade streaks
    speckle = rng.normal(0, 10, (h, w)).astype(np.float32)
    shade = (blades + speckle)[:, :, None]
    return base + shade * np.array([0.4, 1.0, 0.3], np.float32)


def _water(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = _jitter(rng, STUFF[2].color, 10)
    y = np.arange(h, dtype=np.float32)[:, None]
    x = np.arange(w, dtype=np.float32)[None, :]
    wavelength = rng.uniform(6, 12)
    wobble = rng.uniform(0.1, 0.3) * np.sin(2 * np.pi * x / rng.uniform(30, 60) + rng.uniform(0, 6.3))
    waves = np.sin(2 * np.pi * (y / wavelength + wobble) + rng.uniform(0, 6.3))
    return base + (35.0 * waves)[:, :, None] * np.array([0.6, 0.9, 1.0], np.float32)


def _wall(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    brick_h = int(rng.integers(9, 15))
    brick_w = int(brick_h * rng.uniform(2.0, 2.6))
    y = np.arange(h)[:, None]
    x = np.arange(w)[None, :]
    row = y // brick_h
    shifted = x + (row % 2) * (brick_w // 2)
    col = shifted // brick_w
    mortar = (y % brick_h < 2) | (shifted % brick_w < 2)
    shades = rng.uniform(-25, 25, (int(row.max()) + 1, int(col.max()) + 2)).astype(np.float32)
    bricks = _jitter(rng, STUFF[3].color, 8) + shades[row, col][:, :, None]
    return np.where(mortar[:, :, None], np.float32(185), bricks)


def _sand(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = _jitter(rng, STUFF[4].color, 8)
    x = np.arange(w, dtype=np.float32)[None, :]
    y = np.arange(h, dtype=np.float32)[:, None]
    dunes = 12.0 * np.sin(2 * np.pi * (x * 0.3 + y) / rng.uniform(40, 80) + rng.uniform(0, 6.3))
    grain = rng.normal(0, 9, (h, w)).astype(np.float32)
    return base + (dunes + grain)[:, :, None]


_STUFF_TEXTURES: dict[int, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    7: _sky, 8: _grass, 9: _water, 10: _wall, 11: _sand}


def _stuff_layout(rng: np.random.Generator, h: int, w: int, k: int) -> np.ndarray:
    """int H x W map of region index 0..k-1: wavy horizons (banded scenes) or random polygons."""
    if k == 1:
        return np.zeros((h, w), np.int32)
    if rng.random() < 0.6:
        x = np.arange(w, dtype=np.float32)
        bases = np.sort(rng.uniform(0.2, 0.8, k - 1)) * h
        regions = np.zeros((h, w), np.int32)
        y = np.arange(h, dtype=np.float32)[:, None]
        for base in bases:
            amp = rng.uniform(0.0, 0.08) * h
            line = base + amp * np.sin(2 * np.pi * x / rng.uniform(0.5, 1.5) / w + rng.uniform(0, 6.3))
            regions += (y > line[None, :]).astype(np.int32)
        return regions
    regions = np.zeros((h, w), np.uint8)
    for idx in range(1, k):
        n_vertices = int(rng.integers(5, 10))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n_vertices))
        radii = rng.uniform(0.25, 0.6, n_vertices) * min(h, w)
        cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
        pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
        cv2.fillPoly(regions, [np.round(pts).astype(np.int32)], idx)
    return regions.astype(np.int32)


# ----------------------------------------------------------------------------- things


def _polygon(cx: float, cy: float, radii: np.ndarray, angle: float) -> np.ndarray:
    theta = angle + np.arange(len(radii)) * 2 * np.pi / len(radii)
    pts = np.stack([cx + radii * np.cos(theta), cy + radii * np.sin(theta)], axis=1)
    return np.round(pts).astype(np.int32)


def _shape_mask(cat_id: int, h: int, w: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """uint8 H x W mask (1 inside) of one thing's silhouette."""
    mask = np.zeros((h, w), np.uint8)
    if cat_id == 1:
        cv2.circle(mask, (round(cx), round(cy)), max(2, round(r)), 1, -1)
    elif cat_id == 2:
        cv2.fillPoly(mask, [_polygon(cx, cy, np.full(4, r), angle)], 1)
    elif cat_id == 3:
        cv2.fillPoly(mask, [_polygon(cx, cy, np.full(3, r), angle)], 1)
    elif cat_id == 4:
        cv2.fillPoly(mask, [_polygon(cx, cy, np.tile([r, 0.45 * r], 5), angle)], 1)
    elif cat_id == 5:
        axes = (max(2, round(r)), max(2, round(0.55 * r)))
        cv2.ellipse(mask, (round(cx), round(cy)), axes, float(np.degrees(angle)), 0, 360, 1, -1)
    elif cat_id == 6:
        cv2.fillPoly(mask, [_polygon(cx, cy, np.full(6, r), angle)], 1)
    else:
        raise ValueError(f"not a thing category: {cat_id}")
    return mask


def _thing_texture(rng: np.random.Generator, cat: Category, u: np.ndarray, v: np.ndarray,
                   r: float) -> np.ndarray:
    """float32 h x w x 3 texture in the object's own frame (u, v rotate with the object)."""
    base = _jitter(rng, cat.color, 15)
    period = max(3.0, r / 3.0)
    if cat.id == 1:  # shaded disc
        shade = 1.0 - 0.45 * np.clip((u * u + v * v) / (r * r), 0, 1)
        return base * shade[:, :, None]
    if cat.id == 2:  # stripes across the square
        stripe = (np.floor(u / period) % 2)[:, :, None]
        return base * (1 - stripe) + np.float32([170, 195, 255]) * stripe
    if cat.id == 3:  # plain triangle with a soft gradient
        return base * (0.85 + 0.15 * np.clip(v / r, -1, 1))[:, :, None]
    if cat.id == 4:  # plain star
        return np.broadcast_to(base, (*u.shape, 3)).astype(np.float32)
    if cat.id == 5:  # checkerboard ellipse
        check = ((np.floor(u / period) + np.floor(v / period)) % 2)[:, :, None]
        return base * (1 - check) + np.float32([60, 30, 10]) * check
    du = (u % period) - period / 2
    dv = (v % period) - period / 2
    dots = ((du * du + dv * dv) < (period / 3.5) ** 2)[:, :, None]  # white polka dots on the hexagon
    return np.where(dots, np.float32(245), base)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    x, y, w, h = cv2.boundingRect(mask.astype(np.uint8))
    return int(x), int(y), int(w), int(h)


def render_scene(rng: np.random.Generator, height: int, width: int) -> Scene:
    """Draw one image of the world and its exact panoptic segmentation."""
    h, w = height, width
    k = int(rng.integers(1, 4))
    stuff_ids = rng.choice([c.id for c in STUFF], size=k, replace=False)
    regions = _stuff_layout(rng, h, w, k)
    stuff_map = stuff_ids[regions].astype(np.int32)
    canvas = np.empty((h, w, 3), np.float32)
    present = np.flatnonzero(np.bincount(regions.ravel(), minlength=k))
    for region in present:
        texture = _STUFF_TEXTURES[int(stuff_ids[region])](rng, h, w)
        np.copyto(canvas, texture, where=(regions == region)[:, :, None])

    owner = np.full((h, w), -1, np.int32)  # index of the instance that owns each pixel
    instances: list[int] = []
    for _ in range(int(rng.integers(1, 7))):
        cat = THINGS[int(rng.integers(len(THINGS)))]
        r = float(rng.uniform(0.06, 0.28) * min(h, w))
        cx, cy = rng.uniform(0.5 * r, w - 0.5 * r), rng.uniform(0.5 * r, h - 0.5 * r)
        angle = float(rng.uniform(0, 2 * np.pi))
        mask = _shape_mask(cat.id, h, w, cx, cy, r, angle)
        x0, y0, bw, bh = _bbox(mask)
        if bw == 0 or bh == 0:
            continue
        crop = mask[y0 : y0 + bh, x0 : x0 + bw].astype(bool)
        gx = np.arange(x0, x0 + bw, dtype=np.float32)[None, :] - cx
        gy = np.arange(y0, y0 + bh, dtype=np.float32)[:, None] - cy
        u = gx * np.cos(angle) + gy * np.sin(angle)
        v = -gx * np.sin(angle) + gy * np.cos(angle)
        tex = _thing_texture(rng, cat, u, v, r)
        idx = len(instances)
        canvas[y0 : y0 + bh, x0 : x0 + bw][crop] = tex[crop]
        owner[y0 : y0 + bh, x0 : x0 + bw][crop] = idx
        instances.append(cat.id)

    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return label_scene(image, stuff_map, owner, instances)


def label_scene(image: np.ndarray, stuff_map: np.ndarray, owner: np.ndarray, instances: list[int]) -> Scene:
    """Number the segments (stuff by category id, then things in paint order) and build the id map.

    ``stuff_map``: stuff category id per pixel; ``owner``: index into ``instances`` (thing category
    ids in paint order) of the instance that owns each pixel, -1 where stuff shows.
    """
    free = owner < 0
    stuff_area = np.bincount(stuff_map[free], minlength=len(CATEGORIES) + 1)
    visible = np.bincount(owner[~free], minlength=len(instances))
    stuff_lut = np.zeros(len(stuff_area), np.int32)
    thing_lut = np.zeros(len(instances) + 1, np.int32)  # index -1 (stuff pixels) wraps to the last slot
    labels: list[tuple[int, int]] = []  # (segment id, category id)
    for cat_id in np.flatnonzero(stuff_area):
        labels.append((len(labels) + 1, int(cat_id)))
        stuff_lut[cat_id] = len(labels)
    for idx, cat_id in enumerate(instances):
        if visible[idx] >= MIN_VISIBLE_AREA:  # 0 px: dropped; a sliver: left void
            labels.append((len(labels) + 1, cat_id))
            thing_lut[idx] = len(labels)
    segment_map = np.where(free, stuff_lut[stuff_map], thing_lut[owner])
    areas = np.bincount(segment_map.ravel(), minlength=len(labels) + 1)
    segments = [Segment(seg_id, cat_id, int(areas[seg_id]), _bbox(segment_map == seg_id))
                for seg_id, cat_id in labels]
    return Scene(image=image, segment_map=segment_map, segments=segments)
