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

# The real engines (Docker, a registry on 127.0.0.1:5000, the python:3.11-slim
# stand-in) for tests/integration. MLBUILD_ENGINES tells the fixtures how that went:
# "ok", or the reason they could not start, which docker-marked tests skip with.
# Under CI=true an engine that does not start fails the run here, loudly.
# MLBUILD_ENGINES set beforehand skips this (e.g. MLBUILD_ENGINES=ok when they run).
if [ -z "${MLBUILD_ENGINES:-}" ]; then
    if [ "$(uname -s)" = Linux ] && [ "$(id -u)" = 0 ]; then
        engines_log=$(mktemp)
        if bash .ci/engines.sh 2>&1 | tee "$engines_log"; then
            export MLBUILD_ENGINES=ok
        else
            reason=$(grep -h '^engines: FAILED: ' "$engines_log" | tail -n 1 | sed 's/^engines: FAILED: //')
            reason=${reason:-".ci/engines.sh failed: $(tail -n 1 "$engines_log")"}
            if [ "${CI:-}" = true ]; then
                echo "tests/run.sh: CI=true and the engines did not start: $reason" >&2
                rm -f "$engines_log"
                exit 1
            fi
            echo "tests/run.sh: engines not available, docker tests will skip: $reason" >&2
            export MLBUILD_ENGINES="$reason"
        fi
        rm -f "$engines_log"
    else
        # Not ours to start; the fixtures still use an engine that already answers.
        export MLBUILD_ENGINES="not started: tests/run.sh starts engines only as root on Linux"
    fi
fi

# pytest exits 5 when it collected nothing: that is a failure here, never a pass.
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
