"""Entry point for `ray job submit -- python -m jobs.cluster --config ...` (same as `u2seg cluster`)."""

import sys

from u2seg.cli import main

if __name__ == "__main__":
    sys.exit(main(["cluster", *sys.argv[1:]]))
