#!/usr/bin/env bash
# The interoperability suite (interop/): our checkpoints loaded by transformers, llm-compressor's
# read by us. It makes .venv-interop (Python 3.11, torch, transformers, compressed-tensors,
# llm-compressor from interop/requirements.txt) on first use, makes sure the JAX .venv exists, and
# runs pytest in the torch venv; the tests call the JAX side through $W8A8_JAX_PYTHON.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

find_python311() {
  local candidate
  for candidate in python3.11 "$HOME"/.pyenv/versions/3.11*/bin/python3.11 /usr/bin/python3.11 /usr/local/bin/python3.11; do
    if command -v "$candidate" >/dev/null 2>&1 \
        && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      command -v "$candidate"
      return 0
    fi
  done
  echo "error: no Python 3.11 found (the torch side of interop/ needs it); install one with pyenv or uv" >&2
  return 1
}

venv="$root/.venv-interop"
stamp="$venv/.installed-$(cksum <"$root/interop/requirements.txt" | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  python=$(find_python311)
  echo "setting up $venv with $("$python" --version)" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q -r "$root/interop/requirements.txt" >&2
  touch "$stamp"
fi

# The JAX side: env.sh builds .venv if needed; a subshell keeps its activation out of this shell.
W8A8_JAX_PYTHON="$(source "$root/scripts/env.sh" >&2 && command -v python)"
"$W8A8_JAX_PYTHON" -c 'import w8a8_jax' || { echo "error: $W8A8_JAX_PYTHON cannot import w8a8_jax" >&2; exit 1; }
export W8A8_JAX_PYTHON
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

"$venv/bin/python" -m pytest -q interop "$@"
