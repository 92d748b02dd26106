"""`u2seg bench <what>`: run one benchmark, write its JSON next to the others, print a table.

Every benchmark compares two things measured in the same run (a ratio), because wall times on shared
machines are noisy; absolute numbers are reported too, with the machine they came from.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from typing import Any

from u2seg.io import RunRoot

log = logging.getLogger(__name__)


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
                            "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            rows.extend(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, list) and len(v) > 6:
            rows.append((f"{prefix}{k}", f"[{len(v)} values]"))
        else:
            rows.append((f"{prefix}{k}", v))
    return rows


def print_table(title: str, result: dict[str, Any]) -> None:
    rows = _flatten(result)
    width = max(len(k) for k, _ in rows)
    print(f"== u2seg bench {title} ==")
    for k, v in rows:
        print(f"{k:<{width}}  {round(v, 4) if isinstance(v, float) else v}")


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.time()
    what = args.what
    if getattr(args, "overrides", None) and what != "selftrain":
        raise ValueError(f"bench {what} takes no config overrides")
    if what == "maskcut":
        from u2seg.bench.maskcut import bench_maskcut

        result = bench_maskcut(n_images=args.n or (4 if args.quick else 20),
                               image_size=args.image_size or (224 if args.quick else 480),
                               backbone=args.backbone or "vit_small_patch8_224.dino")
    elif what == "cluster":
        import ray

        from u2seg.bench.cluster import bench_cluster

        ray.init(address="local", num_cpus=4, logging_level=logging.WARNING)
        try:
            n = args.n or (20_000 if args.quick else 1_000_000)
            result = bench_cluster(n=n, d=256, k=100 if args.quick else 800, niter=5 if args.quick else 10)
        finally:
            ray.shutdown()
    elif what == "extract":
        from u2seg.bench.extract import bench_extract

        result = bench_extract(n_images=args.n or (4 if args.quick else 16),
                               image_size=args.image_size or (224 if args.quick else 480),
                               backbone=args.backbone or "vit_small_patch8_224.dino")
    elif what == "manifest":
        from u2seg.bench.manifest import bench_manifest

        result = bench_manifest(n=args.n or (5_000 if args.quick else 200_000))
    elif what == "train":
        from u2seg.bench.train import bench_train

        result = bench_train(steps=args.n or (2 if args.quick else 6), image_size=args.image_size or 256,
                             backbone=args.backbone or "vit_small_patch8_224.dino")
    elif what == "scale":
        from u2seg.bench.scale import bench_scale

        sizes = (200, 1_000) if args.quick else ((args.n // 10, args.n) if args.n else (10_000, 100_000))
        result = bench_scale(sizes=sizes, image_px=args.image_size or 48)
    elif what == "stuff":
        from u2seg.bench.stuff import bench_stuff

        result = bench_stuff(steps=args.n or (2 if args.quick else 6), batch_size=4 if args.quick else 8,
                             crop_size=args.image_size or (112 if args.quick else 224),
                             backbone=args.backbone or "vit_small_patch8_224.dino")
    elif what == "refine":
        from u2seg.bench.refine import bench_refine

        result = bench_refine(n_images=args.n or (2 if args.quick else 40),
                              image_size=args.image_size or (128 if args.quick else 480),
                              backbone=args.backbone or "vit_small_patch8_224.dino")
    elif what == "finetune":
        from u2seg.bench.finetune import bench_finetune

        steps = args.n or (2 if args.quick else 20)
        result = bench_finetune(n_train=20 if args.quick else 40, n_held_out=4 if args.quick else 6,
                                selftrain_steps=steps, finetune_steps=steps,
                                image_size=args.image_size or (96 if args.quick else 128),
                                backbone=args.backbone or "resnet18")
    elif what == "selftrain":
        from u2seg.bench.selftrain import bench_selftrain

        result = bench_selftrain(quick=args.quick, n_train=args.n, overrides=args.overrides or (),
                                 work=args.work)
    else:
        raise ValueError(what)
    result = {"benchmark": what, "machine": machine(), "wall_s": round(time.time() - t0, 2), **result}
    if args.out.endswith(".json"):  # one named file
        folder, _, name = args.out.rpartition("/")
        out = RunRoot(folder or ".")
    else:
        out = RunRoot(args.out)
        name = f"{what}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_json(name, result)
    print_table(what, result)
    print(f"written: {out.join(name)}")
    return result
