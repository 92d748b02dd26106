"""Entry point for `ray job submit -- python -m jobs.train --config ...` (same as `u2seg train`)."""

import sys

from u2seg.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
