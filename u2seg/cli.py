"""`u2seg` command line: one subcommand per stage, plus pipeline, finetune, synth, gt-supercategory, export,
bench and config.

Stage commands take ``--config FILE`` (or a built-in name: demo, coco, imagenet) and dotted overrides
after it, e.g. ``u2seg extract --config demo extract.tau=0.2 run.run_root=s3://bucket/run``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from u2seg.config import U2SegConfig, explain, load_config
from u2seg.errors import InputsError, UserError
from u2seg.pipeline.stages import STAGES

log = logging.getLogger("u2seg")

# Stages reached through another command: `u2seg evaluate evaluate.target=model` runs evaluate_model.
_COMMAND_OF_STAGE = {"evaluate_model": "evaluate"}


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML file or built-in name (demo, coco, imagenet)")
    p.add_argument("--force", action="store_true", help="rerun even if the stage's _SUCCESS marker matches")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to SECONDS for another driver's lease on the run root instead of failing")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. extract.tau=0.2")


def _load(args: argparse.Namespace) -> U2SegConfig:
    overrides = list(args.overrides)
    if getattr(args, "rounds", None) is not None:
        overrides.append(f"train.rounds={args.rounds}")
    cfg = load_config(args.config, overrides)
    setup_logging(cfg.run.log_level)
    return cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="u2seg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    sub = parser.add_subparsers(dest="command", required=True)
    for st in STAGES:
        if st.name in _COMMAND_OF_STAGE:
            continue
        _add_config_args(sub.add_parser(st.name, help=st.summary))
    p = sub.add_parser("pipeline", help="every stage in order, skipping finished ones")
    _add_config_args(p)
    p = sub.add_parser("selftrain", help="the train stage with --rounds self-training rounds (predict -> relabel "
                       "-> train); finished rounds are kept")
    _add_config_args(p)
    p.add_argument("--rounds", type=int, default=None, help="overrides train.rounds")

    p = sub.add_parser("finetune", help="fine-tune on finetune.fraction of a labeled set, from the self-trained "
                       "model (finetune.init=u2seg) or the backbone alone (backbone); predict and score the held-out "
                       "set (evaluate.images) with the real categories, into finetune/<init>-<fraction>/")
    _add_config_args(p)

    p = sub.add_parser("synth", help="write the synthetic panoptic world (images + COCO ground truth)")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--out", required=True, help="local folder or s3:// prefix")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-size", type=int, default=160)
    p.add_argument("--max-size", type=int, default=320)
    p.add_argument("--prefix", default="", help="start of every file name (e.g. val_ for a held-out world)")

    p = sub.add_parser("gt-supercategory", help="U2Seg's stuff-supercategory ground truth from a COCO panoptic "
                       "set: stuff relabeled to its supercategory (ids 301..), things kept, PNGs copied; point "
                       "evaluate.gt_panoptic_json at the result for U2Seg's paper protocol")
    p.add_argument("--panoptic-json", required=True, help="COCO panoptic JSON (local path or s3:// URI)")
    p.add_argument("--png-dir", default=None, help="its PNG folder; default: the JSON's name without .json")
    p.add_argument("--out-json", required=True, help="the supercategory panoptic JSON to write")
    p.add_argument("--out-dir", default=None, help="its PNG folder; default: --out-json without .json")
    p.add_argument("--offset", type=int, default=None, help="supercategory k gets id offset + k (default 300, "
                   "as U2Seg)")
    p.add_argument("--merge-stuff", action="store_true", help="also merge an image's stuff segments of one "
                   "supercategory into one (rewrites PNGs; stricter than U2Seg, which keeps them apart)")
    p.add_argument("--config", "-c", default=None, help="YAML file or built-in name, for run.storage.*")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. run.storage.endpoint_url=http://...")

    p = sub.add_parser("export", help="write a label set in another format")
    formats = p.add_subparsers(dest="format", required=True)
    p = formats.add_parser("coco", help="one label set (or a subset) as single COCO instances.json and "
                           "panoptic.json files (and optionally its panoptic PNGs in one folder), streamed")
    p.add_argument("--set", dest="label_set", default="labels",
                   help="labels (default), predict, selftrain/round-R/labels or selftrain/round-R/predictions")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--images", default=None, metavar="LIST_FILE",
                   help="only these images: a file (local or s3://) of URIs or u2seg image ids, one a line")
    p.add_argument("--limit", type=int, default=None, help="at most N images (the first, in group order)")
    p.add_argument("--copy-pngs", action="store_true", help="copy the panoptic PNGs to OUT/panoptic/<image_id>.png "
                   "(the COCO layout: panoptic.json + panoptic/); else the JSON names the set's own PNGs")
    p.add_argument("--config", "-c", default=None, help="YAML file or built-in name (run.run_root, run.storage.*)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. run.run_root=s3://bucket/run")

    p = sub.add_parser("bench", help="benchmarks; each writes JSON and prints a table")
    p.add_argument("what", choices=["maskcut", "extract", "cluster", "train", "manifest", "refine", "stuff", "scale",
                                   "finetune", "selftrain"])
    p.add_argument("--out", default="bench-results", help="folder or s3:// prefix for the JSON, or a .json file")
    p.add_argument("--n", type=int, default=None, help="problem size (images, vectors, keys)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--backbone", default=None)
    p.add_argument("--quick", action="store_true", help="a small run that finishes in seconds")
    p.add_argument("--work", default=None, help="selftrain: keep the worlds and the run root in this folder (a "
                   "rerun with other overrides reruns only the stages they change); default: a temporary one")
    p.add_argument("--override", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="selftrain: dotted config overrides of its settings, e.g. --override train.steps=600")

    p = sub.add_parser("config", help="print the resolved config, or every knob with --explain")
    _add_config_args(p)
    p.add_argument("--explain", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; a user error (bad knob, missing input, unreachable or busy run root) is one line on
    stderr and exit code 2, with the traceback only under ``--debug``."""
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"u2seg: error: {exc}", file=sys.stderr)
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

        info = make_synthetic(args.out, args.n, seed=args.seed, min_size=args.min_size, max_size=args.max_size,
                              prefix=args.prefix)
        print(json.dumps(info, indent=2, default=str))
        return 0
    if cmd == "gt-supercategory":
        return _gt_supercategory(args)
    if cmd == "export":
        return _export(args)
    if cmd == "bench":
        setup_logging()
        from u2seg.bench.cli import run_bench

        run_bench(args)
        return 0
    cfg = _load(args)
    if cmd == "pipeline":
        from u2seg.pipeline.run_pipeline import run_pipeline

        run_pipeline(cfg, force=args.force, wait_for_lease_s=args.wait)
        return 0
    from u2seg.pipeline.run_stage import run_stage

    if cmd == "finetune":
        from u2seg.pipeline.finetune import check_finetune_config, finetune_folder

        check_finetune_config(cfg)  # before the lease and Ray: a missing knob is one line at once
        cmd = finetune_folder(cfg)
    if cmd == "selftrain":
        cmd = "train"
    if cmd == "evaluate" and cfg.evaluate.target == "model":
        cmd = "evaluate_model"
    print(json.dumps(run_stage(cmd, cfg, force=args.force, wait_for_lease_s=args.wait), indent=2, default=str))
    return 0


def _without_json(uri: str, flag: str) -> str:
    if not uri.endswith(".json"):
        raise UserError(f"pass {flag}: its default is the JSON's name without .json, and {uri} does not end in .json")
    return uri[:-5]


def _gt_supercategory(args: argparse.Namespace) -> int:
    """`u2seg gt-supercategory`: write U2Seg's supercategory version of a panoptic set (local or s3://)."""
    from u2seg.evaluate.supercategory import SUPERCATEGORY_OFFSET, write_supercategory_set

    cfg = _load(args)
    png_dir = args.png_dir or _without_json(args.panoptic_json, "--png-dir")
    out_dir = args.out_dir or _without_json(args.out_json, "--out-dir")
    offset = SUPERCATEGORY_OFFSET if args.offset is None else args.offset
    try:
        stats = write_supercategory_set(args.panoptic_json, png_dir, args.out_json, out_dir,
                                        cfg.run.storage.storage_options(), offset=offset,
                                        merge_stuff=args.merge_stuff)
    except FileNotFoundError as exc:
        raise InputsError(f"gt-supercategory: an input is missing: {exc}") from exc
    print(json.dumps({"panoptic_json": args.out_json, "png_dir": out_dir, **stats}, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    """`u2seg export coco`: a label set of the configured run root as single COCO files (local or s3://)."""
    from u2seg.pipeline.export import export_coco, read_image_list
    from u2seg.pipeline.run_stage import open_root

    cfg = _load(args)
    storage, retry_s = cfg.run.storage.storage_options(), cfg.run.storage.retry_s
    images = read_image_list(args.images, storage, retry_s) if args.images else None
    stats = export_coco(open_root(cfg), args.label_set, args.out, storage, retry_s=retry_s, images=images,
                        limit=args.limit, copy_pngs=args.copy_pngs)
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
