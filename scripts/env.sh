#!/usr/bin/env bash
# Source me: creates (once) and activates the virtual environment for u2seg.
# The environment lives outside the clone, keyed by the dependency spec, so a fresh clone reuses it.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
# torch/torchvision pinned for the dev/CI install (the pair that imports on our machines);
# the package itself only asks for a range (pyproject.toml).
TORCH_PIN="torch==2.14.1 torchvision==0.29.1"
KEY="$( (cat "$REPO/pyproject.toml"; echo "$TORCH_PIN"; "$PY" --version) | sha256sum | cut -c1-16)"
VENV="${U2SEG_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/u2seg/venv-$KEY}"
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/.complete" ]; then
  echo "[u2seg] creating the environment in $VENV (first run only; several minutes)" >&2
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install --quiet $TORCH_PIN
  "$VENV/bin/pip" install --quiet -e "$REPO[dev]"
  touch "$VENV/.complete"
fi
# Several clones may share one environment: this clone's code comes first on the path (Ray workers
# inherit it), whichever clone the environment's editable install points at.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"
