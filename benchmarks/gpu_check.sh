#!/usr/bin/env bash
# The GPU check, end to end in under 5 minutes on one GPU machine (every step's timeout is
# cut to what is left of DEADLINE_S, 270 s from the start, less what the later steps need, and
# a step that outlives its timeout is killed 5 s later):
#   1. what the machine has (GPU, torch, transformers, Ray);
#   2. wheels shipped in benchmarks/wheels/, if any, installed offline;
#   3. tests/test_cuda.py (the `cuda` tests and the CPU checks of the GPU path; at most 110 s);
#   4. benchmarks/bench_gpu.py: tokens/s against transformers and against the link floor,
#      streaming from the store, from the pinned host tier, and stages sharing the GPU
#      (at most 120 s; bench.json and bench.md keep the rows finished if it is cut short);
#   5. benchmarks/bench_loader.py: the loader's GB/s from the page cache into pinned staging
#      with 1, 2 and 4 threads, with and without the host-to-device copy (at most 40 s).
#
#   bash benchmarks/gpu_check.sh RESULTS_DIR
#
# RESULTS_DIR gets summary.txt (what ran, and how it went), env.txt, nvidia-smi.txt,
# cuda-tests.txt and cuda-tests.xml, bench.txt, bench.json and bench.md, loader.txt and loader.json.
# The machine needs PyTorch with CUDA, transformers, accelerate and greenlet; pytest for step 3.
# A machine with no package index gets greenlet from its wheel, fetched here beforehand:
#   pip download greenlet --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_17_x86_64 -d benchmarks/wheels
# With Ray importable (or its wheel in benchmarks/wheels/) the stages that share the GPU
# run as Ray actors with fractional GPUs; without, in one process (in_process=True).
# PYTHON picks the interpreter (default: python3). Exit status: 0 when every step passed.
set -uo pipefail

OUT=${1:?usage: bash benchmarks/gpu_check.sh RESULTS_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
STARTED=$(date +%s)
DEADLINE_S=270
STATUS=0
: > "$OUT/summary.txt"

# limit WANT LATER: a step's timeout, WANT seconds at most, leaving LATER seconds of the
# deadline to the steps after it (at least 5 s, so a step late in the day still starts).
limit() {
    local left=$(( DEADLINE_S - ($(date +%s) - STARTED) - $2 ))
    (( left < 5 )) && left=5
    (( left < $1 )) && echo "$left" || echo "$1"
}

say() { echo "[gpu_check +$(( $(date +%s) - STARTED ))s] $*" | tee -a "$OUT/summary.txt"; }
has() { "$PY" -c "import $1" > /dev/null 2>&1; }

# 1. the machine
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || say "nvidia-smi is not available"
"$PY" - > "$OUT/env.txt" 2>&1 <<'EOF'
import importlib, platform, sys
import torch
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i}", p.name, f"{p.total_memory / 2**30:.1f} GiB", "free", f"{torch.cuda.mem_get_info(i)[0] / 2**30:.1f} GiB")
for name in ("transformers", "accelerate", "safetensors", "ray", "pytest"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:
        print(name, "missing", type(e).__name__)
from distlayer import versions  # the tested ranges: outside them distlayer refuses to run
for c in versions.checks():
    print("range", c.name, c.installed, c.supported, "ok" if c.ok else "OUTSIDE: " + c.fix)
EOF
cat "$OUT/env.txt"
if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    say "FAILED: $PY has no CUDA-enabled torch that sees a GPU (see env.txt); nothing else ran"
    exit 1
fi

# 2. wheels shipped beside this script: installed offline, no package index
WHEELS="$ROOT/benchmarks/wheels"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    if "$PY" -m pip install --no-index --find-links "$WHEELS" "$WHEELS"/*.whl > "$OUT/pip.txt" 2>&1; then
        say "installed the wheels of benchmarks/wheels offline: $(cd "$WHEELS" && ls *.whl | tr '\n' ' ')"
    else
        say "installing benchmarks/wheels failed (pip.txt); going on with what is installed"
    fi
fi
for need in accelerate safetensors greenlet; do
    has "$need" || { say "FAILED: $need is missing: put its wheel in benchmarks/wheels/ and run again"; exit 1; }
done
if has ray; then
    RAY=(--ray)
    say "Ray $("$PY" -c 'import ray; print(ray.__version__)'): stages that share the GPU run as Ray actors (gpus_per_stage)"
else
    RAY=()
    say "no Ray: stages that share the GPU run in this process (in_process=True, 2 and 4 stages); the Ray test skips"
fi

# 3. the tests of the GPU path
if has pytest; then
    timeout -k 5 "$(limit 110 160)" "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_compression.py::test_cuda_resident_and_streamed_agree \
        --junitxml="$OUT/cuda-tests.xml" \
        > "$OUT/cuda-tests.txt" 2>&1
    rc=$?
    tail -n 15 "$OUT/cuda-tests.txt"
    if [ "$rc" -eq 0 ]; then
        say "the cuda tests passed: $(grep -Eo '[0-9]+ passed.*' "$OUT/cuda-tests.txt" | tail -n 1)"
    else
        say "FAILED: the cuda tests (exit $rc$( { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && echo ', out of time'); cuda-tests.txt)"
        STATUS=1
    fi
else
    say "FAILED: pytest is missing, so the cuda tests did not run: put its wheels in benchmarks/wheels/"
    STATUS=1
fi

# 4. the benchmark
timeout -k 5 "$(limit 120 40)" "$PY" benchmarks/bench_gpu.py --out "$OUT" ${RAY[@]+"${RAY[@]}"} > "$OUT/bench.txt" 2>&1
rc=$?
if [ "$rc" -eq 0 ]; then
    cat "$OUT/bench.md"
    say "benchmark done: bench.md, bench.json"
else
    tail -n 20 "$OUT/bench.txt"
    [ -f "$OUT/bench.md" ] && cat "$OUT/bench.md"
    say "FAILED: the benchmark (exit $rc$( { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && echo ', out of time'); bench.txt)"
    STATUS=1
fi

# 5. the loader: page cache into pinned staging buffers, 1, 2 and 4 threads
timeout -k 5 "$(limit 40 0)" "$PY" benchmarks/bench_loader.py --threads 1 2 4 --repeat 2 --json "$OUT/loader.json" > "$OUT/loader.txt" 2>&1
rc=$?
if [ "$rc" -eq 0 ]; then
    grep -v '^{' "$OUT/loader.txt"
    say "loader benchmark done: loader.txt, loader.json"
else
    tail -n 20 "$OUT/loader.txt"
    say "FAILED: the loader benchmark (exit $rc$( { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && echo ', out of time'); loader.txt)"
    STATUS=1
fi

say "finished with status $STATUS"
exit "$STATUS"
