"""Entry point for `ray job submit -- python -m jobs.pipeline --config ...` (same as `u2seg pipeline`)."""

import sys

from u2seg.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
