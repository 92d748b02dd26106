"""Entry point for `ray job submit -- python -m jobs.manifest --config ...` (same as `u2seg manifest`)."""

import sys

from u2seg.cli import main

if __name__ == "__main__":
    sys.exit(main(["manifest", *sys.argv[1:]]))
