#!/usr/bin/env bash
# Installs llama.cpp's Python binding (llama-cpp-python) into the venv: the real llama.cpp that proves GGUF exports,
# quantizes k-quants and serves .gguf files. PyPI has only its source, so the wheel is compiled once per machine
# (BUILD_MINUTES below) and kept in $LORA_TUNE_WHEEL_CACHE (default ~/.cache/lora-tune/wheels); later installs (and
# CI on the same machine) take it in seconds.
# - GGML_NATIVE=OFF: built for generic x86-64 with AVX2, not this CPU's own extensions (the 0.3.36 wheel built here
#   has no AVX-512 instruction), so a cache copied to another machine with AVX2 still runs.
# - LLAVA_BUILD=OFF: no multimodal library (mtmd, the CLIP image and audio encoders); lora-tune's tests and commands
#   use llama.cpp's text model, vocabulary, quantizer and chat only, and llama_cpp imports mtmd only for its
#   multimodal chat handlers. (llama-cpp-python's CMakeLists forces llama.cpp's common library on, and builds no
#   tools, tests or examples when vendored: this is the one optional part it lets us leave out.)
# - every core: CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) for ninja/make, whatever the generator's own default.
# Usage: scripts/install_llama_cpp.sh [PYTHON]   (make llama-cpp)
set -euo pipefail
python=${1:-.venv/bin/python}
version=0.3.36
BUILD_MINUTES=6  # measured on 2 idle cores: 364 s (docs/development.md); longer while other work runs
cache=${LORA_TUNE_WHEEL_CACHE:-$HOME/.cache/lora-tune/wheels}
wheel_glob="$cache/llama_cpp_python-$version-*.whl"

if "$python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$version')" 2>/dev/null; then
  exit 0
fi
mkdir -p "$cache"
# shellcheck disable=SC2086
if ! ls $wheel_glob >/dev/null 2>&1; then
  echo "llama-cpp-python $version: no wheel in $cache; compiling llama.cpp once for this machine" \
    "(about $BUILD_MINUTES minutes on 2 cores; the wheel is kept for later installs)..." >&2
  start=$(date +%s)
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$python" -m pip wheel --quiet --no-deps "llama-cpp-python==$version" -w "$cache"
  echo "llama-cpp-python $version built in $(( $(date +%s) - start )) s; kept in $cache" >&2
fi
# Its dependencies (numpy, jinja2, diskcache, typing-extensions) come pinned from requirements.lock.
"$python" -m pip install --quiet --no-deps --no-index --find-links "$cache" "llama-cpp-python==$version"
"$python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
