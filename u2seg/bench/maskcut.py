"""Benchmark: reference dense MaskCut solver vs batched Lanczos on the same ViT features.

Measures per-image MaskCut time for both solvers, their mask agreement, and how often our
deterministic eigenvector sign / tie convention changes a cut compared with the reference rules applied
to LAPACK's raw eigenvector. Random-init weights: this measures speed and solver agreement, never
segmentation quality.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np
import torch

from u2seg.features import build_backbone, extract_features, preprocess
from u2seg.maskcut.core import maskcut_detailed
from u2seg.maskcut.rules import canonical_sign, foreground_partition, mask_iou, seed_component

logger = logging.getLogger(__name__)


def _bench_images(n: int, seed: int) -> list[np.ndarray]:
    """Synthetic-world scenes when that module is available, otherwise flat shapes on a background."""
    rng = np.random.default_rng(seed)
    sizes = [(int(rng.integers(300, 480)), int(rng.integers(360, 640))) for _ in range(n)]
    try:
        from u2seg.data.world import render_scene
    except ImportError:
        render_scene = None
    if render_scene is not None:
        return [render_scene(rng, h, w).image for h, w in sizes]
    import cv2

    images = []
    for h, w in sizes:
        img = np.empty((h, w, 3), np.uint8)
        img[:] = rng.integers(0, 256, 3, dtype=np.uint8)
        for _ in range(int(rng.integers(1, 5))):
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            r = int(rng.uniform(0.08, 0.3) * min(h, w))
            center = (int(rng.integers(r, w - r)), int(rng.integers(r, h - r)))
            if rng.random() < 0.5:
                cv2.circle(img, center, r, color, -1)
            else:
                cv2.rectangle(img, (center[0] - r, center[1] - r), (center[0] + r, center[1] + r), color, -1)
        images.append(img)
    return images


def _pair_ious(ma: torch.Tensor, va: torch.Tensor, mb: torch.Tensor, vb: torch.Tensor) -> list[float]:
    """IoU of masks paired by index. Both invalid: agreement, not counted. One invalid: IoU 0."""
    out = []
    for k in range(ma.shape[0]):
        if not va[k] and not vb[k]:
            continue
        out.append(float(mask_iou(ma[k], mb[k])) if va[k] and vb[k] else 0.0)
    return out


def _sign_changes(eigvecs: list[torch.Tensor], grid: tuple[int, int]) -> tuple[int, int]:
    """(changed, total) cuts where our rules and the raw reference rules disagree on the same eigvec."""
    changed = total = 0
    for x in eigvecs:
        ours = seed_component(*foreground_partition(canonical_sign(x), grid), grid)
        ref = seed_component(*foreground_partition(x, grid, exact_argmax=True), grid)
        changed += int((ours != ref).flatten(1).any(1).sum())
        total += x.shape[0]
    return changed, total


def _image_record(keys: torch.Tensor, grid: tuple[int, int], tau: float, n_masks: int) -> dict:
    """Both solvers on one image's features -> the per-image numbers the summary aggregates."""
    t0 = time.perf_counter()
    md, vd, sd = maskcut_detailed(keys, grid, tau=tau, n_masks=n_masks, solver="dense", keep_eigvecs=True)
    t1 = time.perf_counter()
    ml, vl, sl = maskcut_detailed(keys, grid, tau=tau, n_masks=n_masks, solver="lanczos")
    t2 = time.perf_counter()
    changed, n_cuts = _sign_changes(sd.eigvecs, grid)
    return {
        "dense_s": t1 - t0, "lanczos_s": t2 - t1, "dense_solve_s": sd.solve_s, "lanczos_solve_s": sl.solve_s,
        "ious": _pair_ious(md[0], vd[0], ml[0], vl[0]), "valid_dense": vd[0].tolist(),
        "valid_lanczos": vl[0].tolist(), "sign_changed": changed, "cuts": n_cuts,
    }


def _load_records(path: str | None) -> dict[int, dict]:
    if not path:
        return {}
    try:
        with open(path) as fh:
            return {r["index"]: r for r in map(json.loads, filter(str.strip, fh))}
    except FileNotFoundError:
        return {}


def bench_maskcut(
    n_images: int = 20,
    image_size: int = 480,
    backbone: str = "vit_small_patch8_224.dino",
    n_masks: int = 3,
    seed: int = 0,
    tau: float = 0.15,
    records_path: str | None = None,
) -> dict:
    """Run dense and Lanczos MaskCut on the same features; return timings and agreement numbers.

    Times are per image (batch of 1), affinity + solver + rules, on whatever device torch defaults to
    (CPU here). `lanczos_batched_per_image_s` runs all images as one batch. The dense side takes
    minutes per image: with `records_path` each image's numbers are appended to that JSON-lines file
    as they finish, and images already recorded there (same settings) are not run again.
    """
    images = _bench_images(n_images, seed)
    model = build_backbone(backbone, "none", image_size=image_size, seed=seed)
    if torch.cuda.is_available():
        model = model.cuda()
    feats, backbone_s = [], []
    for img in images:
        t0 = time.perf_counter()
        f = extract_features(model, preprocess([img], image_size), amp="none")
        backbone_s.append(time.perf_counter() - t0)
        feats.append(f.keys)
    grid = f.grid
    settings = {"n_images": n_images, "image_size": image_size, "backbone": backbone, "n_masks": n_masks,
                "seed": seed, "tau": tau}
    done = {i: r for i, r in _load_records(records_path).items() if r.get("settings") == settings}
    records = []
    for i, keys in enumerate(feats):
        if i in done:
            records.append(done[i])
            continue
        rec = {"index": i, "settings": settings, **_image_record(keys, grid, tau, n_masks)}
        records.append(rec)
        if records_path:
            with open(records_path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        logger.info("image %d/%d: dense %.2fs lanczos %.3fs ious %s valid %s/%s", i + 1, len(feats),
                    rec["dense_s"], rec["lanczos_s"], [round(v, 3) for v in rec["ious"]],
                    rec["valid_dense"], rec["valid_lanczos"])
    batch = torch.cat(feats)
    t0 = time.perf_counter()
    maskcut_detailed(batch, grid, tau=tau, n_masks=n_masks, solver="lanczos")
    batched = (time.perf_counter() - t0) / max(1, len(feats))
    return _summary(records, settings, grid, backbone_s, batched, str(batch.device))


def _summary(records: list[dict], settings: dict, grid: tuple[int, int], backbone_s: list[float],
             batched: float, device: str) -> dict:
    def mean(v: list[float]) -> float:
        return float(np.mean(v)) if v else float("nan")

    col = lambda key: [r[key] for r in records]  # noqa: E731
    ious = [v for r in records for v in r["ious"]]
    valid_pairs = [(a, b) for r in records for a, b in zip(r["valid_dense"], r["valid_lanczos"], strict=True)]
    changed, cuts = sum(col("sign_changed")), sum(col("cuts"))
    return {
        **settings,
        "grid": list(grid),
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "backbone_s": backbone_s,
        "dense_s": col("dense_s"),
        "lanczos_s": col("lanczos_s"),
        "dense_mean_s": mean(col("dense_s")),
        "lanczos_mean_s": mean(col("lanczos_s")),
        "speedup": mean(col("dense_s")) / mean(col("lanczos_s")),
        "dense_solver_mean_s": mean(col("dense_solve_s")),
        "lanczos_solver_mean_s": mean(col("lanczos_solve_s")),
        "solver_speedup": mean(col("dense_solve_s")) / mean(col("lanczos_solve_s")),
        "lanczos_batched_per_image_s": batched,
        "mean_iou": mean(ious),
        "n_iou_pairs": len(ious),
        "valid_agreement": mean([float(a == b) for a, b in valid_pairs]),
        "sign_convention_changed": changed,
        "sign_convention_cuts": cuts,
        "sign_convention_changed_fraction": changed / max(1, cuts),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-images", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=480)
    parser.add_argument("--backbone", default="vit_small_patch8_224.dino")
    parser.add_argument("--n-masks", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--records", default=None, help="JSON-lines file of per-image results (resumable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = bench_maskcut(args.n_images, args.image_size, args.backbone, args.n_masks, args.seed,
                           records_path=args.records)
    logger.info("result %s", json.dumps(result))
    return result


if __name__ == "__main__":
    main()
