#!/usr/bin/env bash
# The test command: unit, integration (2-node local Ray + S3 server) and e2e tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export RAY_DATA_DISABLE_PROGRESS_BARS=1 TQDM_DISABLE=1 RAY_USAGE_STATS_ENABLED=0
ruff check u2seg jobs tests
exec pytest -m "unit or integration or e2e" -p no:cacheprovider "$@"
