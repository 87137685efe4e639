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
# The torch range the project is tested with; setup.py's install_requires and the Dockerfile's
# TORCH say the same (tests/test_package.py checks). On a Linux GPU machine PyPI's wheel is the
# CUDA build; on this project's CPU machines the same range resolves to the local CPU build.
torch_spec="torch>=2.13,<2.14"
stamp="$(python -c 'import sys; print(sys.prefix)')/.dalle_ds_installed"
want="$(cat "$repo/setup.py" "${BASH_SOURCE[0]}" | sha1sum | cut -c1-16)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    python -m pip install -q --upgrade pip
    # Before the package, so pip keeps a torch already in range (CPU or CUDA build) and replaces
    # one outside it with a build of this range rather than whatever the package install picks.
    python -m pip install -q "$torch_spec"
    python -m pip install -q -e "${repo}[test]"
    # OpenAI's reference dVAE classes for the compatibility tests; its declared deps pull a
    # torchvision that breaks beside a CPU torch, and it needs only attrs + requests (in [test]).
    python -m pip install -q --no-deps "dall-e==0.1"
    # taming-transformers' Encoder, Decoder and VectorQuantizer for the VQGAN equality tests (its
    # declared deps pull pytorch-lightning and more; the modules used need only torch and numpy).
    python -m pip install -q --no-deps "taming-transformers==0.0.1"
    echo "$want" > "$stamp"
fi
# DeepSpeed JIT-builds ops into this cache; a private one avoids stale locks from other runs.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$repo/.cache/torch_extensions}"
cd "$repo"
