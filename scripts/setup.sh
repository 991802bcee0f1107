#!/usr/bin/env bash
# Create or reuse .venv and install dhad with everything its tests and commands need.
# CPU machines get the CPU build of torch (torch==2.13.0 installs from local disk on our machines;
# an unpinned torch would pull a multi-GB CUDA build). Set DHAD_TORCH to override the torch spec.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DHAD_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
stamp="$VENV/.dhad-installed"
want="$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import dhad, torch" 2>/dev/null; then
  exit 0
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [ -n "${DHAD_TORCH:-}" ]; then spec="$DHAD_TORCH"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then spec="torch"
  else spec="torch==2.13.0"; fi
  echo "[setup] installing $spec"
  $PIP install -q "$spec"
fi
echo "[setup] installing dhad and its dependencies"
$PIP install -q -e ".[test,eval,interop]"
echo "$want" > "$stamp"
