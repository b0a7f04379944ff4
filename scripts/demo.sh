#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run `distlayer demo`: SmolLM2-135M-Instruct on a 2-stage Ray pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/distlayer demo "$@"
