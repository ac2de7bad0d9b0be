#!/usr/bin/env bash
# The test suite (CPU only, no network). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
exec .venv/bin/pytest "$@"
