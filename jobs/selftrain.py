"""Entry point for `ray job submit -- python -m jobs.selftrain --config ...` (same as `u2seg selftrain`)."""

import sys

from u2seg.cli import main

if __name__ == "__main__":
    sys.exit(main(["selftrain", *sys.argv[1:]]))
