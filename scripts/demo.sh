#!/usr/bin/env bash
# The demo: a jitted fp8 Llama MLP block through every path this machine's backend supports.
set -euo pipefail
source "$(dirname "$0")/env.sh"
python -m w8a8_jax demo "$@"
