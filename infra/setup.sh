#!/usr/bin/env bash
# `make setup`'s Python part: the venv, every pinned dependency, and the llama.cpp engine, timed step by step.
#
# Why this shape (measured on 2 cores, see README "Setup"):
# - uv installs the pinned tree (torch's CUDA build is a few GB) with parallel downloads, and keeps a cache in
#   ~/.cache/uv, so a second clone links instead of downloading;
# - llama-cpp-python ships only an sdist. It is built once into a wheel under ~/.cache/flywheel/wheels/<key>,
#   the key made from its version, the CMake arguments and this CPU's flags (GGML_NATIVE compiles for the host
#   CPU, so a wheel built on one CPU is never used on another), and the build runs while uv downloads;
# - only what the engine needs is built: libllama and ggml's native CPU backend, no llava/mtmd, no server,
#   tools, tests or examples (llama.cpp turns those off when it is a subproject), with a parallel build.
set -euo pipefail
VENV=${VENV:-.venv}
PY_SYS=${PY_SYS:-python3}
UV_VERSION=0.13.9
LLAMA=$(sed -n 's/^llama_cpp_python==//p' constraints.txt)
CMAKE_ARGS_LLAMA="-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF"
CACHE=${FLYWHEEL_CACHE:-$HOME/.cache/flywheel}
TIMES=$VENV/setup-times.txt

t0=$(date +%s.%N)
step() { # step NAME START: append "NAME seconds" to the timing file and say it
  local dt; dt=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$2" "$(date +%s.%N)")
  echo "$1 $dt" >>"$TIMES"; echo "setup: $1 done in ${dt} s"
}

s=$(date +%s.%N)
test -x "$VENV/bin/python" || "$PY_SYS" -m venv "$VENV"
: >"$TIMES"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"
UV="$VENV/bin/uv"
step venv+uv "$s"

# The llama.cpp wheel, in the background while uv installs the rest.
key=$( (echo "$LLAMA $CMAKE_ARGS_LLAMA"; grep -m1 '^flags' /proc/cpuinfo) | sha256sum | cut -c1-16)
WHEELS="$CACHE/wheels/llama-$key"
SRC="$CACHE/src"
mkdir -p "$SRC" "$CACHE/wheels"
(
  s=$(date +%s.%N)
  if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "setup: building llama-cpp-python $LLAMA (libllama + native CPU backend only, $(nproc) jobs; once per CPU) ..."
    test -f "$SRC/llama_cpp_python-$LLAMA.tar.gz" ||
      "$VENV/bin/python" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA" -d "$SRC"
    tmp=$(mktemp -d "$CACHE/wheels/.build-XXXX")
    CMAKE_ARGS="$CMAKE_ARGS_LLAMA" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
      "$VENV/bin/python" -m pip wheel -q --no-deps -w "$tmp" "$SRC/llama_cpp_python-$LLAMA.tar.gz" >"$tmp.log" 2>&1 ||
      { echo "setup: the llama-cpp-python build failed; its log: $tmp.log"; exit 1; }
    mkdir -p "$WHEELS" && mv "$tmp"/*.whl "$WHEELS"/ && rmdir "$tmp" && rm -f "$tmp.log"
  else
    echo "setup: llama-cpp-python $LLAMA: reusing the wheel built for this CPU ($WHEELS)"
  fi
  step llama-wheel "$s"
) &
llama_pid=$!

s=$(date +%s.%N)
echo "setup: installing the pinned dependencies with uv (torch is a few GB on a fresh machine) ..."
grep -v '^llama_cpp_python==' constraints.txt >"$VENV/constraints-nollama.txt"
"$UV" pip install -q --python "$VENV/bin/python" -r "$VENV/constraints-nollama.txt"
step deps "$s"

wait "$llama_pid"
s=$(date +%s.%N)
"$UV" pip install -q --python "$VENV/bin/python" --find-links "$WHEELS" -c constraints.txt -e ".[dev]"
# llama.cpp's GGUF converter, for app/backends/gguf.py, from the same sdist
rm -rf "$VENV/share/llama.cpp" && mkdir -p "$VENV/share/llama.cpp"
tar -xzf "$SRC/llama_cpp_python-$LLAMA.tar.gz" -C "$VENV/share/llama.cpp" --strip-components=3 \
  $(printf "llama_cpp_python-$LLAMA/vendor/llama.cpp/%s " convert_hf_to_gguf.py conversion gguf-py)
step project "$s"
step python-total "$t0"
