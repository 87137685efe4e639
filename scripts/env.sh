# Sourced by demo.sh and test.sh: create (or reuse) the project virtualenv and install dalle-ds into it.
# Override the location with DALLE_DS_VENV; set DALLE_DS_NO_VENV=1 to use the current Python as is.
# shellcheck shell=bash
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ "${DALLE_DS_NO_VENV:-0}" != 1 ]]; then
    venv="${DALLE_DS_VENV:-$repo/.venv}"
    [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
fi
stamp="$(python -c 'import sys; print(sys.prefix)')/.dalle_ds_installed"
want="$(sha1sum < "$repo/setup.py" | cut -c1-16)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    python -m pip install -q --upgrade pip
    if ! python -c "import torch" 2>/dev/null; then
        if command -v nvidia-smi >/dev/null 2>&1; then
            python -m pip install -q torch                # CUDA build for GPU machines
        else
            python -m pip install -q "torch==2.13.0"      # no GPU: the CPU build where one is available
        fi
    fi
    python -m pip install -q -e "${repo}[test]"
    # OpenAI's reference dVAE classes for the compatibility tests; its declared deps pull a
    # torchvision that breaks beside a CPU torch, and it needs only attrs + requests (in [test]).
    python -m pip install -q --no-deps "dall-e==0.1"
    echo "$want" > "$stamp"
fi
# DeepSpeed JIT-builds ops into this cache; a private one avoids stale locks from other runs.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$repo/.cache/torch_extensions}"
cd "$repo"
