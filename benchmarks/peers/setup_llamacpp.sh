#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` (the OpenAI-compatible server with parallel slots
# and continuous batching) and `llama-perplexity` from the llama.cpp vendored in
# llama-cpp-python's PyPI sdist, as a new user would: native ISA, default options.
#
# Why not `pip install 'llama-cpp-python[server]'`: its server holds one Llama instance
# behind a lock (llama_cpp/server/app.py: llama_outer_lock/llama_inner_lock), so parallel
# requests are served one at a time; comparing a batching server against it would be unfair.
#
#   benchmarks/peers/setup_llamacpp.sh            # .peers/bin/: GGML_NATIVE=ON (AMX where the CPU has it)
#   benchmarks/peers/setup_llamacpp.sh --no-amx   # .peers/bin-noamx/: the same ISA minus AMX
#
# The --no-amx build exists only for hosts where the native build's AMX path crashes:
# benchmarks/compare_peers.py probes the native build first and falls back to this one
# (never to `-nr`, which would also turn off the AVX-512/AVX2 repacked kernels), and records
# which build ran and why. Idempotent: does nothing if the binaries already exist. Everything
# lands in .peers/ (git-ignored). Env: PIP, JOBS, VERSION.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PEERS="$ROOT/.peers"
VARIANT=native
[[ "${1:-}" == "--no-amx" ]] && VARIANT=noamx
BIN_DIR="$PEERS/bin"
[[ "$VARIANT" == noamx ]] && BIN_DIR="$PEERS/bin-noamx"
# One build tree for both: switching variants recompiles only ggml-cpu, where the ISA flags go.
BUILD="$PEERS/build"
PIP="${PIP:-$ROOT/.venv/bin/pip}"
JOBS="${JOBS:-2}"
VERSION="${VERSION:-0.3.36}"   # pinned so every run benchmarks the same llama.cpp

if [[ -x "$BIN_DIR/llama-server" && -x "$BIN_DIR/llama-perplexity" ]]; then
    echo "llama.cpp ($VARIANT) already built: $BIN_DIR"
    exit 0
fi

mkdir -p "$PEERS/src" "$BIN_DIR"
cd "$PEERS/src"
SDIST="llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
    "$PIP" download --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d .
fi
SRC="$PEERS/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
[[ -d "$SRC" ]] || tar xzf "$SDIST"

# CPU only, no network features (no internet here: no TLS, no prebuilt web UI download).
ISA=(-DGGML_NATIVE=ON)
if [[ "$VARIANT" == noamx ]]; then
    # GGML_NATIVE=ON means -march=native, which turns AMX on wherever the CPU has it; so
    # spell out the host's other extensions instead (the same kernels but the AMX ones).
    flags=" $(grep -m1 '^flags' /proc/cpuinfo) "
    has() { [[ "$flags" == *" $1 "* ]] && echo ON || echo OFF; }
    ISA=(-DGGML_NATIVE=OFF -DGGML_SSE42="$(has sse4_2)" -DGGML_AVX="$(has avx)" -DGGML_AVX2="$(has avx2)"
         -DGGML_BMI2="$(has bmi2)" -DGGML_FMA="$(has fma)" -DGGML_F16C="$(has f16c)"
         -DGGML_AVX_VNNI="$(has avx_vnni)" -DGGML_AVX512="$(has avx512f)"
         -DGGML_AVX512_VBMI="$(has avx512vbmi)" -DGGML_AVX512_VNNI="$(has avx512_vnni)"
         -DGGML_AVX512_BF16="$(has avx512_bf16)"
         -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
fi
cmake -S "$SRC" -B "$BUILD" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    "${ISA[@]}" \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF
cmake --build "$BUILD" --target llama-server llama-perplexity -j "$JOBS"
cp "$BUILD/bin/llama-server" "$BUILD/bin/llama-perplexity" "$BIN_DIR/"
# What this build was configured with, for the benchmark results (compare_peers.py reads it).
grep -E '^(GGML_[A-Z0-9_]+|CMAKE_BUILD_TYPE):' "$BUILD/CMakeCache.txt" | grep -v CCACHE > "$BIN_DIR/build-options.txt"
echo "built $BIN_DIR ($VARIANT)"
"$BIN_DIR/llama-server" --version 2>&1 | head -2 || true
