"""Entry point for `ray job submit -- python -m jobs.extract --config ...` (same as `u2seg extract`)."""

import sys

from u2seg.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))
