"""Entry point for `ray job submit -- python -m jobs.label --config ...` (same as `u2seg label`)."""

import sys

from u2seg.cli import main

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))
