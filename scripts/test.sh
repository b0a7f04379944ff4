#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite, slow tests included; then the
# floor run (scripts/floor.sh): the exactness tests with every dependency at its lowest
# declared version. Arguments go to the main run's pytest; with arguments (a daily
# subset such as -m "not slow") the floor run is skipped unless DISTLAYER_FLOOR=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
if [ $# -eq 0 ] || [ "${DISTLAYER_FLOOR:-0}" = 1 ]; then
    bash scripts/floor.sh
fi
