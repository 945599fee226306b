#!/usr/bin/env bash
# The GPU-machine checks of the open issues, in one call (repo root as cwd, 2 GPUs):
#   bash benchmarks/gpu_checks.sh checks OUTDIR   # GPU tests, sanitizer, large shapes, tuning, 2-GPU run
#   bash benchmarks/gpu_checks.sh bench OUTDIR    # the benchmark (GPU 0) while GPU 1 runs the kernel tests,
#                                                 # large shapes, tuning and the vocabulary sweep
#   bash benchmarks/gpu_checks.sh quick OUTDIR    # bench.py --quick, timed
# Needs .whl/ with the cut-cross-entropy and liger-kernel wheels. Every step has its own time limit
# and log under OUTDIR, so one failure or overrun does not lose the others.
set -u
part=$1
out=$2
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > "$out/gpus.csv"
start=$(date +%s)
stamp() { echo "$(( $(date +%s) - start )) s: $*" >> "$out/timeline.txt"; }

left() { echo $(( $1 - ($(date +%s) - start) )); }   # seconds until $1 s after the start

if [ "$part" = checks ]; then
  stamp "vocab-parallel start"
  timeout 210 python benchmarks/vocab_parallel_gpu.py --skip-chunked --timeout 200 --out "$out/vocab_parallel" \
    > "$out/vocab_parallel.log" 2>&1
  stamp "vocab-parallel rc=$?"
  (
    export CUDA_VISIBLE_DEVICES=0
    timeout $(left 440) python benchmarks/tune_pallas.py --bwd > "$out/tune.log" 2>&1; stamp "tune rc=$?"
    timeout $(left 580) python -m pytest -m "gpu and large" -q -p no:cacheprovider tests/test_gpu_large.py > "$out/large.log" 2>&1
    stamp "large rc=$?"
  ) &
  (
    export CUDA_VISIBLE_DEVICES=1
    timeout $(left 480) python -m pytest -m "gpu and not large" -q -p no:cacheprovider -n 8 -rfE \
      tests/test_jax_pallas.py tests/test_torch_pallas.py tests/test_torch_gpu.py > "$out/gpu_tests.log" 2>&1
    stamp "gpu tests rc=$?"
    timeout $(left 580) compute-sanitizer --tool memcheck --target-processes all --print-limit 20 \
      python benchmarks/sanitize_pallas.py > "$out/sanitizer.log" 2>&1
    stamp "sanitizer rc=$?"
  ) &
  wait
elif [ "$part" = bench ]; then
  ( export CUDA_VISIBLE_DEVICES=0
    timeout $(left 575) python benchmarks/bench.py --out "$out/full" > "$out/full.log" 2>&1
    stamp "full rc=$?" ) &
  ( export CUDA_VISIBLE_DEVICES=1
    timeout $(left 210) python -m pytest -m "gpu and not large" -q -p no:cacheprovider -n 4 -rfE \
      tests/test_jax_pallas.py tests/test_torch_pallas.py > "$out/gpu_tests.log" 2>&1
    stamp "gpu tests rc=$?"
    timeout $(left 280) python -m pytest -m "gpu and large" -q -p no:cacheprovider -rfE tests/test_gpu_large.py \
      > "$out/large.log" 2>&1
    stamp "large rc=$?"
    timeout $(left 420) python benchmarks/tune_pallas.py --bwd > "$out/tune.log" 2>&1; stamp "tune rc=$?"
    timeout $(left 575) python benchmarks/bench.py --workloads none --sweep --out "$out/sweep" > "$out/sweep.log" 2>&1
    stamp "sweep rc=$?" ) &
  wait
elif [ "$part" = final ]; then
  ( export CUDA_VISIBLE_DEVICES=0
    timeout $(left 560) python benchmarks/bench.py --out "$out/full" > "$out/full.log" 2>&1
    stamp "full rc=$?" ) &
  ( export CUDA_VISIBLE_DEVICES=1; s=$(date +%s)
    timeout $(left 200) python benchmarks/bench.py --quick --out "$out/quick" > "$out/quick.log" 2>&1
    stamp "quick rc=$? wall $(( $(date +%s) - s )) s (imports included)"
    timeout $(left 330) python benchmarks/bench.py --workloads none --sweep --out "$out/sweep" > "$out/sweep.log" 2>&1
    stamp "sweep rc=$?"
    timeout $(left 560) python benchmarks/tune_pallas.py --bwd-only > "$out/tune.log" 2>&1; stamp "tune rc=$?" ) &
  wait
elif [ "$part" = last ]; then
  ( export CUDA_VISIBLE_DEVICES=0
    timeout $(left 560) python benchmarks/bench.py --out "$out/full" > "$out/full.log" 2>&1
    stamp "full rc=$?" ) &
  ( export CUDA_VISIBLE_DEVICES=1
    timeout $(left 250) python -m pytest -m "gpu and not large" -q -p no:cacheprovider -n 6 -rfE \
      tests/test_jax_pallas.py tests/test_torch_pallas.py > "$out/gpu_tests.log" 2>&1
    stamp "gpu tests rc=$?"
    timeout $(left 320) compute-sanitizer --tool memcheck --target-processes all --print-limit 20 \
      python benchmarks/sanitize_pallas.py > "$out/sanitizer.log" 2>&1
    stamp "sanitizer rc=$?"
    timeout $(left 560) python benchmarks/bench.py --workloads none --sweep --out "$out/sweep" > "$out/sweep.log" 2>&1
    stamp "sweep rc=$?" ) &
  wait
elif [ "$part" = quick ]; then
  ( export CUDA_VISIBLE_DEVICES=0; s=$(date +%s)
    timeout 300 python benchmarks/bench.py --quick --out "$out/quick" > "$out/quick.log" 2>&1
    stamp "quick rc=$? wall $(( $(date +%s) - s )) s (imports included)" ) &
  wait
fi
stamp done
tar czf /tmp/all.tgz -C "$out" . && mv /tmp/all.tgz "$out/all.tgz"  # one file: the return has a file-count limit
