"""Entry point for `ray job submit -- python -m jobs.finetune --config ...` (same as `u2seg finetune`)."""

import sys

from u2seg.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
