#!/usr/bin/env bash
# The test command: installs what the tests need, lints, then runs the whole suite with real peers.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || { echo "setup failed"; exit 1; }
.venv/bin/ruff check lazyiscsi tests bench targetcli-plugin || { echo "ruff found problems"; exit 1; }
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=25 "$@" tests
rc=$?
# pytest exits 5 when it collected no test: that is a failure of the suite, not a pass.
if [ "$rc" -eq 5 ]; then echo "no tests were collected"; exit 1; fi
exit "$rc"
