#!/usr/bin/env bash
# The demo: synthetic images -> every stage -> metric table, on a local Ray and a local run root.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export RAY_USAGE_STATS_ENABLED=0
N="${U2SEG_DEMO_IMAGES:-16}"
if [ ! -f runs/demo-data/gt/panoptic.json ]; then
  u2seg synth --n "$N" --out runs/demo-data --min-size 160 --max-size 256
fi
u2seg pipeline --config demo "$@"
