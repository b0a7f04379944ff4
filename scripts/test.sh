#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the tests.
#
#   bash scripts/test.sh          the whole suite, slow tests included, then the floor run
#                                 (scripts/floor.sh: the exactness tests with every
#                                 dependency at its lowest declared version); what CI runs
#   bash scripts/test.sh --fast   the daily tier: every test not marked slow (tiny models,
#                                 in-process stages, one Ray start per module), no floor run
#
# Other arguments go to pytest (a subset such as tests/test_planner.py); with arguments
# the floor run is skipped unless DISTLAYER_FLOOR=1.
set -euo pipefail
cd "$(dirname "$0")/.."
fast=()
if [ "${1:-}" = --fast ]; then
    shift
    fast=(-m "not slow")
    set -- "${fast[@]}" "$@"
fi
bash scripts/setup.sh
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
if { [ $# -eq 0 ] && [ ${#fast[@]} -eq 0 ]; } || [ "${DISTLAYER_FLOOR:-0}" = 1 ]; then
    bash scripts/floor.sh
fi
