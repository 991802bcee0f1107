#!/usr/bin/env bash
# The whole test suite: sets up .venv (see setup.sh), then runs pytest. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The web-chat test drives a real headless Chromium (Debian's package); install it when we can.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[test] installing chromium for the web-chat browser test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "[test] WARNING: could not install chromium; the browser test will be skipped"
fi
export DHAD_DATA_DIR=${DHAD_DATA_DIR:-$(cd .. && pwd)/shared/data}
.venv/bin/python -m pytest -q -p no:cacheprovider --timeout=900 "$@"
# The adapter against a real vLLM (its CPU build, in .venv-vllm): on in CI (CI=true), opt-in elsewhere
# with DHAD_TEST_VLLM=1 (DHAD_TEST_VLLM=0 switches it off in CI too).
want_vllm=${DHAD_TEST_VLLM:-0}
if [ -z "${DHAD_TEST_VLLM:-}" ] && [ "${CI:-}" = true ]; then want_vllm=1; fi
if [ "$want_vllm" = 1 ]; then
  bash scripts/test-vllm.sh
fi
# dhad's GGUF export against a real llama.cpp (llama-cpp-python built from its source package in
# .venv-llamacpp, plus its vendored convert_hf_to_gguf.py): on in CI, opt-in elsewhere with
# DHAD_TEST_LLAMACPP=1 (DHAD_TEST_LLAMACPP=0 switches it off in CI too). The first run compiles llama.cpp.
want_llamacpp=${DHAD_TEST_LLAMACPP:-0}
if [ -z "${DHAD_TEST_LLAMACPP:-}" ] && [ "${CI:-}" = true ]; then want_llamacpp=1; fi
if [ "$want_llamacpp" = 1 ]; then
  bash scripts/test-llamacpp.sh
fi
