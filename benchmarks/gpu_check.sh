#!/bin/bash
# The GPU checks of the triton backend, as one script for a lent CUDA machine (the device
# tool runs it in the repository root with $OUT set; elsewhere OUT=some/dir bash benchmarks/gpu_check.sh):
# the GPU-only tests, the triton decode and NaN/±inf tests on CUDA tensors, then the decode bench
# with a per-kernel profile of two cases.  Uses the machine's python3 and its packages (torch,
# triton, numba, numpy, pytest, xdist, hypothesis); T1/T2/T3 cap each step in seconds (on an
# H200, 4 Dec 2026: ≈ 60, 70–85 and 40–70 s; a capped pytest gets SIGINT, on which xdist stops
# its workers — killed outright, they ran on and slowed the bench after them); SWEEP=1 adds a
# sweep of the decode kernel's tile choices; OLD_SRC=dir runs the same bench again on another
# tree's package (e.g. `mkdir -p .gpu_old && git archive COMMIT src | tar -x -C .gpu_old`, then
# OLD_SRC=.gpu_old/src, the folder carried to the device machine) — before/after on one machine.
export PYTHONPATH=src PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/dotattn-gpu-check}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv
python3 -c "import torch,triton,numba,numpy;print('torch',torch.__version__,'triton',triton.__version__,'numba',numba.__version__,'numpy',numpy.__version__)"
T0=$(date +%s)
timeout -s INT -k 15 "${T1:-150}" python3 -m pytest -q -p no:cacheprovider -n 8 -m gpu tests/kernels/test_triton_gpu.py tests/decoding/test_kvcache.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
echo "gpu tests: $(( $(date +%s) - T0 )) s"; T0=$(date +%s)
timeout -s INT -k 15 "${T2:-150}" python3 -m pytest -q -p no:cacheprovider -n 8 tests/kernels/test_triton_decode.py tests/decoding/test_nonfinite_decode.py tests/reliability/test_nonfinite.py -k "triton or tensors or kernel or accuracy or merge or bits or plan or casts" 2>&1 | tee "$OUT/decode_tests.log" | tail -5
echo "decode tests: $(( $(date +%s) - T0 )) s"; T0=$(date +%s)
timeout "${T3:-150}" python3 benchmarks/gpu_decode.py --json "$OUT/gpu_decode.json" 2>&1 | tee "$OUT/gpu_decode.log"
timeout 60 python3 benchmarks/gpu_decode.py --batches 1 8 --contexts 32768 --dtypes bfloat16 --layouts contiguous --profile 2>&1 | tee "$OUT/gpu_decode_profile.log"
if [ -n "${OLD_SRC:-}" ]; then  # the same bench on the other tree's package (T5 caps it)
    PYTHONPATH="$OLD_SRC" timeout "${T5:-150}" python3 benchmarks/gpu_decode.py --json "$OUT/gpu_decode_old.json" 2>&1 | tee "$OUT/gpu_decode_old.log"
fi
echo "bench: $(( $(date +%s) - T0 )) s"
if [ -n "${SWEEP:-}" ]; then  # the tile choices of the decode kernel (SWEEP=1; T4 caps it)
    timeout "${T4:-120}" python3 benchmarks/gpu_decode.py --sweep --batches 8 1 --contexts 32768 --dtypes bfloat16 float32 float16 2>&1 | tee "$OUT/gpu_decode_sweep.log"
fi
