#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` (the OpenAI-compatible server with parallel slots
# and continuous batching) from the llama.cpp vendored in llama-cpp-python's PyPI sdist.
#
# Why not `pip install 'llama-cpp-python[server]'`: its server holds one Llama instance
# behind a lock (llama_cpp/server/app.py: llama_outer_lock/llama_inner_lock), so parallel
# requests are served one at a time; comparing a batching server against it would be unfair.
#
# Idempotent: does nothing if the binary already exists. Everything lands in .peers/
# (git-ignored). Usage:  benchmarks/peers/setup_llamacpp.sh   (env: PIP, JOBS, VERSION)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PEERS="$ROOT/.peers"
BIN="$PEERS/bin/llama-server"
PIP="${PIP:-$ROOT/.venv/bin/pip}"
JOBS="${JOBS:-2}"
VERSION="${VERSION:-0.3.36}"   # pinned so every run benchmarks the same llama.cpp

if [[ -x "$BIN" ]]; then
    echo "llama-server already built: $BIN"
    exit 0
fi

mkdir -p "$PEERS/src" "$PEERS/bin"
cd "$PEERS/src"
SDIST="llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
    "$PIP" download --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d .
fi
SRC="$PEERS/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
[[ -d "$SRC" ]] || tar xzf "$SDIST"

# CPU only, native ISA (this machine is also the one it runs on), no network features
# (no internet here: no TLS, no prebuilt web UI download), nothing but the server target.
cmake -S "$SRC" -B "$PEERS/build" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF
cmake --build "$PEERS/build" --target llama-server llama-perplexity -j "$JOBS"
cp "$PEERS/build/bin/llama-server" "$PEERS/build/bin/llama-perplexity" "$PEERS/bin/"
echo "built $BIN"
"$BIN" --version 2>&1 | head -2 || true
