#!/usr/bin/env bash
# The test suite on CPU (Pallas kernels in interpret mode), plus the formatter and linter.
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$root"
ruff format --check .
ruff check .
# Two workers, each taking whole test files (module fixtures such as a loaded model are built once).
python -m pytest -q -n 2 --dist loadfile "$@"
