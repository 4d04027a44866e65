# Sourced by the scripts in this folder: make .venv (once) and keep it in step
# with pyproject.toml. EXTRAS names the optional dependency groups to install.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
stamp=".venv/.streamlayer-${EXTRAS}-$(sha1sum pyproject.toml | cut -c1-12)"
if [[ ! -f $stamp ]]; then
  .venv/bin/python -m pip install --quiet -e ".[${EXTRAS}]"
  touch "$stamp"
fi
