"""`u2seg` command line: one subcommand per stage, plus pipeline, synth, bench and config.

Stage commands take ``--config FILE`` (or a built-in name: demo, coco, imagenet) and dotted overrides
after it, e.g. ``u2seg extract --config demo extract.tau=0.2 run.run_root=s3://bucket/run``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from u2seg.config import STAGES, ConfigError, U2SegConfig, explain, load_config

log = logging.getLogger("u2seg")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML file or built-in name (demo, coco, imagenet)")
    p.add_argument("--force", action="store_true", help="rerun even if the stage's _SUCCESS marker matches")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. extract.tau=0.2")


def _load(args: argparse.Namespace) -> U2SegConfig:
    cfg = load_config(args.config, args.overrides)
    setup_logging(cfg.run.log_level)
    return cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="u2seg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        _add_config_args(sub.add_parser(stage, help=f"run the {stage} stage"))
    p = sub.add_parser("pipeline", help="every stage in order, skipping finished ones")
    _add_config_args(p)
    p = sub.add_parser("predict", help="batch inference of the trained model into the label format")
    _add_config_args(p)
    p = sub.add_parser("selftrain", help="predict -> relabel -> train, for --rounds rounds")
    _add_config_args(p)
    p.add_argument("--rounds", type=int, default=None, help="overrides train.rounds")

    p = sub.add_parser("synth", help="write the synthetic panoptic world (images + COCO ground truth)")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--out", required=True, help="local folder or s3:// prefix")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-size", type=int, default=160)
    p.add_argument("--max-size", type=int, default=320)

    p = sub.add_parser("bench", help="benchmarks; each writes JSON and prints a table")
    p.add_argument("what", choices=["maskcut", "extract", "cluster", "train", "manifest", "refine"])
    p.add_argument("--out", default="bench-results", help="folder or s3:// prefix for the JSON")
    p.add_argument("--n", type=int, default=None, help="problem size (images, vectors, keys)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--backbone", default=None)
    p.add_argument("--quick", action="store_true", help="a small run that finishes in seconds")

    p = sub.add_parser("config", help="print the resolved config, or every knob with --explain")
    _add_config_args(p)
    p.add_argument("--explain", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "config":
        if args.explain:
            print(explain())
        else:
            print(_load(args).to_yaml())
        return 0
    if cmd == "synth":
        setup_logging()
        from u2seg.data.synthetic import make_synthetic

        info = make_synthetic(args.out, args.n, seed=args.seed, min_size=args.min_size, max_size=args.max_size)
        print(json.dumps(info, indent=2, default=str))
        return 0
    if cmd == "bench":
        setup_logging()
        from u2seg.bench.cli import run_bench

        run_bench(args)
        return 0
    cfg = _load(args)
    if cmd in STAGES:
        from u2seg.pipeline.runner import run_stage

        stats = run_stage(cmd, cfg, force=args.force)
        print(json.dumps(stats, indent=2, default=str))
        return 0
    if cmd == "pipeline":
        from u2seg.pipeline.orchestrate import run_pipeline

        summary = run_pipeline(cfg, force=args.force)
        return 0 if summary.get("ok", True) else 1
    if cmd == "predict":
        from u2seg.pipeline.predict import run_predict
        from u2seg.pipeline.runner import ensure_ray, open_root

        ensure_ray(cfg)
        print(json.dumps(run_predict(cfg, open_root(cfg)), indent=2, default=str))
        return 0
    if cmd == "selftrain":
        from u2seg.pipeline.selftrain import run_selftrain

        print(json.dumps(run_selftrain(cfg, rounds=args.rounds), indent=2, default=str))
        return 0
    raise AssertionError(cmd)


if __name__ == "__main__":
    sys.exit(main())
