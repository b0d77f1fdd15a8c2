#!/usr/bin/env bash
# `make setup`'s Python part, in two steps that the Makefile runs so the slow one overlaps everything else:
#   infra/setup.sh deps    the venv and every pinned dependency but llama-cpp-python, the project (editable), and
#                          llama.cpp's GGUF converter (from the sdist) for app/backends/gguf.py
#   infra/setup.sh wheel   the llama-cpp-python wheel, built once per CPU with the system Python (pip's build
#                          isolation), so it needs nothing from `deps` and the Makefile starts both at once
#   infra/setup.sh llama   llama-cpp-python installed from that wheel
# Each step appends "<step> <seconds>" to .venv/setup-times.txt (the README's setup breakdown comes from it).
#
# Why this shape (measured on 2 cores, README "Setup"):
# - uv installs the pinned tree (torch's CUDA build is a few GB) with parallel downloads in ~30 s, and keeps a
#   cache in ~/.cache/uv, so a second clone links instead of downloading (pip took minutes);
# - llama-cpp-python ships only an sdist (minutes of C++ on 2 cores). It is built once into a wheel under
#   ~/.cache/flywheel/wheels/llama-<key>, the key made from its version, the CMake arguments and this CPU's flags
#   (GGML_NATIVE compiles for the host CPU, so a wheel built on one CPU is never used on another);
# - only what the engine needs is built: libllama, ggml and its native CPU backend, with one compile job per
#   core. llama.cpp turns off its server, tools, tests and examples as a subproject, LLAVA_BUILD=OFF drops mtmd,
#   and the sdist's CMakeLists forces llama.cpp's `common` library on (FORCE beats -D), which only mtmd uses:
#   we switch it off in a copy of the sdist. Measured: 3m51 s of CPU against 7m55 s for the sdist as shipped.
set -euo pipefail
STEP=${1:?usage: infra/setup.sh deps|wheel|llama}
VENV=${VENV:-.venv}
PY_SYS=${PY_SYS:-python3}
UV_VERSION=0.13.9
LLAMA=$(sed -n 's/^llama_cpp_python==//p' constraints.txt)
CMAKE_ARGS_LLAMA="-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF"
CACHE=${FLYWHEEL_CACHE:-$HOME/.cache/flywheel}
SRC="$CACHE/src"
SDIST="$SRC/llama_cpp_python-$LLAMA.tar.gz"
TIMES=$VENV/setup-times.txt
t0=$(date +%s.%N)
done_in() { # record and say how long this step took
  local dt; dt=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$t0" "$(date +%s.%N)")
  echo "$1 $dt" >>"$TIMES"; echo "setup: $1 done in ${dt} s"
}
mkdir -p "$SRC" "$CACHE/wheels"
sdist() { test -f "$SDIST" || "$PY_SYS" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA" -d "$SRC"; }

case "$STEP" in
deps)
  test -x "$VENV/bin/python" || "$PY_SYS" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"
  echo "setup: installing the pinned dependencies with uv (torch is a few GB on a fresh machine) ..."
  grep -v '^llama_cpp_python==' constraints.txt >"$VENV/constraints-nollama.txt"
  "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" -r "$VENV/constraints-nollama.txt"
  "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" --no-deps -e ".[dev]"
  sdist  # llama.cpp's GGUF converter, from the same sdist the engine is built from
  rm -rf "$VENV/share/llama.cpp" && mkdir -p "$VENV/share/llama.cpp"
  tar -xzf "$SDIST" -C "$VENV/share/llama.cpp" --strip-components=3 \
    $(printf "llama_cpp_python-$LLAMA/vendor/llama.cpp/%s " convert_hf_to_gguf.py conversion gguf-py)
  done_in deps
  ;;
wheel | llama)
  key=$( (echo "$LLAMA $CMAKE_ARGS_LLAMA no-common"; grep -m1 '^flags' /proc/cpuinfo) | sha256sum | cut -c1-16)
  WHEELS="$CACHE/wheels/llama-$key"
  if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "setup: building llama-cpp-python $LLAMA (libllama + ggml's native CPU backend, $(nproc) jobs; once per CPU) ..."
    sdist
    tmp=$(mktemp -d "$CACHE/wheels/.build-XXXX")
    tar -xzf "$SDIST" -C "$tmp"
    src="$tmp/llama_cpp_python-$LLAMA"
    sed -i 's/set(LLAMA_BUILD_COMMON ON CACHE BOOL/set(LLAMA_BUILD_COMMON OFF CACHE BOOL/' "$src/CMakeLists.txt"
    grep -q 'set(LLAMA_BUILD_COMMON ON' "$src/CMakeLists.txt" &&
      { echo "setup: could not switch off llama.cpp's common library in $src/CMakeLists.txt"; exit 1; }
    CMAKE_ARGS="$CMAKE_ARGS_LLAMA" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
      "$PY_SYS" -m pip wheel -q --disable-pip-version-check --no-deps -w "$tmp/out" "$src" \
      >"$tmp.log" 2>&1 || { echo "setup: the llama-cpp-python build failed; its log: $tmp.log"; exit 1; }
    mkdir -p "$WHEELS" && mv "$tmp"/out/*.whl "$WHEELS"/ && rm -rf "$tmp" "$tmp.log"
    test "$STEP" = wheel && { mkdir -p "$VENV"; done_in llama-wheel; }
  else
    echo "setup: llama-cpp-python $LLAMA: reusing the wheel built for this CPU ($WHEELS)"
  fi
  test "$STEP" = wheel && exit 0
  "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" --no-deps --find-links "$WHEELS" "llama-cpp-python==$LLAMA"
  "$VENV/bin/python" -c "import llama_cpp" || { echo "setup: llama_cpp does not import: rm -rf $WHEELS and rerun"; exit 1; }
  done_in llama
  ;;
*) echo "usage: infra/setup.sh deps|wheel|llama"; exit 2 ;;
esac
