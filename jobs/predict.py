"""Entry point for `ray job submit -- python -m jobs.predict --config ...` (same as `u2seg predict`)."""

import sys

from u2seg.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
