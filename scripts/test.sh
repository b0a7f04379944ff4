#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the tests.
#
#   bash scripts/test.sh          the whole suite, slow tests included, then the floor run
#                                 (scripts/floor.sh: the exactness tests with every
#                                 dependency at its lowest declared version); what CI runs
#   bash scripts/test.sh --fast   the daily tier: every test not marked slow (tiny models,
#                                 in-process stages, one Ray start per module), no floor run
#
# Tests run in DISTLAYER_TEST_WORKERS (default 2) pytest-xdist workers, a file to a worker,
# the longest files first; a test marked exclusive runs with nothing beside it
# (tests/conftest.py). DISTLAYER_TEST_WORKERS=0 runs them in this process, one by one.
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
floor=0
if { [ $# -eq 0 ] && [ ${#fast[@]} -eq 0 ]; } || [ "${DISTLAYER_FLOOR:-0}" = 1 ]; then
    floor=1
    bash scripts/floor.sh --prepare > .venv-floor.log 2>&1 &  # its environment builds while the suite runs
    prepared=$!
fi
workers="${DISTLAYER_TEST_WORKERS:-2}"
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 -n "$workers" --dist loadfile "$@"
if [ $floor = 1 ]; then
    if ! wait "$prepared"; then
        cat .venv-floor.log
        echo "scripts/floor.sh --prepare failed (above): the floor environment did not build" >&2
        exit 1
    fi
    bash scripts/floor.sh
fi
