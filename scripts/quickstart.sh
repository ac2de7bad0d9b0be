#!/usr/bin/env bash
# The main job on the embedded default: PGD-AT on the offline digits dataset, then clean, PGD-20
# and reference AutoAttack accuracy on its test split. Extra arguments go to train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
exec .venv/bin/python train.py fit --config configs/quickstart.yaml "$@"
