#!/usr/bin/env bash
# The test suite on CPU (Pallas kernels in interpret mode), plus the formatter and linter.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$root"
ruff format --check .
ruff check .
python -m pytest -q "$@"
