"""Entry point for `ray job submit -- python -m jobs.export coco --config ... --out ...` (same as `u2seg export`)."""

import sys

from u2seg.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
