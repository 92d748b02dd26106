"""Entry point for `ray job submit -- python -m jobs.gt_supercategory --panoptic-json ... --out-json ...`
(same as `u2seg gt-supercategory`)."""

import sys

from u2seg.cli import main

if __name__ == "__main__":
    sys.exit(main(["gt-supercategory", *sys.argv[1:]]))
