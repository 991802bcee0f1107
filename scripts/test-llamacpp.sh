#!/usr/bin/env bash
# The real-llama.cpp tests (tests/test_llamacpp_real.py): llama-cpp-python built from its source package
# (PyPI sdist) in a venv of its own (.venv-llamacpp), and llama.cpp's own convert_hf_to_gguf.py, which that
# source package vendors (used from there, never copied into the repo). `bash scripts/test.sh` runs this after
# the main suite when DHAD_TEST_LLAMACPP=1 or CI=true. The build takes a while on 2 cores (~15-30 min).
# DHAD_LLAMACPP_SPEC overrides the version; CMAKE_ARGS is passed through to the llama.cpp build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DHAD_LLAMACPP_VENV:-.venv-llamacpp}
SPEC=${DHAD_LLAMACPP_SPEC:-llama-cpp-python==0.3.36}
PY=${PYTHON:-python3}
MAIN_PY=${DHAD_PYTHON:-.venv/bin/python}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[test-llamacpp] creating $VENV"
  "$PY" -m venv "$VENV"
fi
src_dir() { find "$VENV/src" -maxdepth 1 -mindepth 1 -type d -name 'llama_cpp_python-*' | head -1; }
if [ -z "$(src_dir)" ]; then
  echo "[test-llamacpp] fetching the $SPEC source package"
  mkdir -p "$VENV/src"
  if ! "$VENV/bin/python" -m pip download -q --no-binary :all: --no-deps "$SPEC" -d "$VENV/src"; then
    echo "[test-llamacpp] WARNING: could not download $SPEC; the real-llama.cpp tests did NOT run" >&2
    exit 0
  fi
  tar xzf "$VENV"/src/llama_cpp_python-*.tar.gz -C "$VENV/src"
fi
SRC=$(src_dir)
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "[test-llamacpp] building llama-cpp-python from $SRC (slow: compiles llama.cpp)"
  export CMAKE_ARGS="${CMAKE_ARGS:-} -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF"
  export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
  # like the vLLM script: an environment that cannot build it says so loudly and goes on; once built,
  # a failing test fails the run
  if ! "$VENV/bin/python" -m pip install -q "$SRC" numpy; then
    echo "[test-llamacpp] WARNING: could not build $SPEC; the real-llama.cpp tests did NOT run" >&2
    exit 0
  fi
fi
export DHAD_LLAMACPP_PYTHON="$PWD/$VENV/bin/python" DHAD_LLAMACPP_SRC="$PWD/$SRC/vendor/llama.cpp"
DHAD_REQUIRE_LLAMACPP=1 exec "$MAIN_PY" -m pytest -q -p no:cacheprovider --timeout=1800 tests/test_llamacpp_real.py "$@"
