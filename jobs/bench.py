"""Entry point for `ray job submit -- python -m jobs.bench --config ...` (same as `u2seg bench`)."""

import sys

from u2seg.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
