#!/usr/bin/env bash
# Sets up everything the test suite needs on a fresh machine and runs all of it.
# This is the README's test command, and what .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'

# pytest exits 5 when it collected nothing: that is a failure here, never a pass.
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
