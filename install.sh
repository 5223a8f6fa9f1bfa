#!/usr/bin/env bash
# Installs automerge into the active Python environment; `./install.sh test` adds the test tools.
# With no torch installed and no NVIDIA GPU, PyTorch's CPU build comes first so that pip does not
# pull a multi-GB CUDA build; a torch that is already installed (a GPU user's CUDA build) is kept.
set -euo pipefail
cd "$(dirname "$0")"
py=${PYTHON:-python3}
pip_install() { "$py" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$py" -c "import torch" 2>/dev/null && ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "no GPU found: installing PyTorch's CPU build" >&2
  pip_install --retries 1 --index-url https://download.pytorch.org/whl/cpu torch 2>/dev/null \
    || pip_install --no-index torch 2>/dev/null \
    || pip_install torch
fi
extras=""
[ "${1:-}" = "test" ] && extras="[test]"
pip_install -e ".${extras}"
