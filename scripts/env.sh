#!/usr/bin/env bash
# Builds .venv with the tested versions (requirements/constraints.txt) and lit_robust installed
# in editable mode. Does nothing when .venv already matches the constraints and setup.cfg.
set -euo pipefail
cd "$(dirname "$0")/.."
want=$(cat requirements/constraints.txt setup.cfg pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat .venv/.lit_robust_env 2>/dev/null)" = "$want" ]; then
  exit 0
fi
echo "scripts/env.sh: building .venv with the pinned versions (about two minutes, once)" >&2
rm -rf .venv
python3 -m venv .venv
log=.venv/install.log
pip_install() { .venv/bin/python -m pip install --disable-pip-version-check -c requirements/constraints.txt "$@" >>"$log" 2>&1 || { tail -n 40 "$log" >&2; exit 1; }; }
pip_install setuptools wheel
pip_install --no-build-isolation -e '.[test,timm,docs]'
echo "$want" > .venv/.lit_robust_env
