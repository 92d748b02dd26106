"""Entry point for `ray job submit -- python -m jobs.evaluate --config ...` (same as `u2seg evaluate`)."""

import sys

from u2seg.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
