#!/usr/bin/env bash
# The GPU-machine checks of the open issues, in one call (repo root as cwd, 2 GPUs):
#   bash benchmarks/gpu_checks.sh checks OUTDIR   # GPU tests, sanitizer, large shapes, tuning, 2-GPU run
#   bash benchmarks/gpu_checks.sh bench OUTDIR    # the benchmark (GPU 0) while GPU 1 runs the kernel tests,
#                                                 # large shapes, tuning and the vocabulary sweep
#   bash benchmarks/gpu_checks.sh final OUTDIR    # the benchmark (GPU 0); --quick, the sweep and tuning (GPU 1)
#   bash benchmarks/gpu_checks.sh last OUTDIR     # the benchmark (GPU 0); kernel tests, sanitizer, sweep, --quick (GPU 1)
#   bash benchmarks/gpu_checks.sh quick OUTDIR    # bench.py --quick, timed
#   bash benchmarks/gpu_checks.sh mosaic OUTDIR   # Mosaic GPU forward: its GPU tests and tuning (GPU 0);
#                                                 # filtered kernel tests and filtered bench rows (GPU 1)
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

# step NAME DEADLINE CMD...: run CMD until DEADLINE s after the start, output in NAME.log; rc and
# wall time go to the timeline.
step() {
  local name=$1 deadline=$2 s
  shift 2
  s=$(date +%s)
  timeout "$(left "$deadline")" "$@" > "$out/$name.log" 2>&1
  stamp "$name rc=$? wall $(( $(date +%s) - s )) s"
}
gpu_tests() {  # DEADLINE WORKERS FILES...
  step gpu_tests "$1" python -m pytest -m "gpu and not large" -q -p no:cacheprovider -n "$2" -rfE "${@:3}"
}
large() { step large "$1" python -m pytest -m "gpu and large" -q -p no:cacheprovider -rfE tests/test_gpu_large.py; }
sanitizer() {
  step sanitizer "$1" compute-sanitizer --tool memcheck --target-processes all --print-limit 20 \
    python benchmarks/sanitize_pallas.py
}
tune() { step tune "$1" python benchmarks/tune_pallas.py "${@:2}"; }
full() { step full "$1" python benchmarks/bench.py --out "$out/full"; }
sweep() { step sweep "$1" python benchmarks/bench.py --workloads none --sweep --out "$out/sweep"; }
quick() { step quick "$1" python benchmarks/bench.py --quick --out "$out/quick"; }  # its wall time: the < 2 min check

case "$part" in
  checks)
    step vocab_parallel 210 python benchmarks/vocab_parallel_gpu.py --skip-chunked --timeout 200 --out "$out/vocab_parallel"
    ( export CUDA_VISIBLE_DEVICES=0; tune 440 --bwd; large 580 ) &
    ( export CUDA_VISIBLE_DEVICES=1
      gpu_tests 480 8 tests/test_jax_pallas.py tests/test_torch_pallas.py tests/test_torch_gpu.py; sanitizer 580 ) &
    wait ;;
  bench)
    ( export CUDA_VISIBLE_DEVICES=0; full 575 ) &
    ( export CUDA_VISIBLE_DEVICES=1
      gpu_tests 210 4 tests/test_jax_pallas.py tests/test_torch_pallas.py; large 280; tune 420 --bwd; sweep 575 ) &
    wait ;;
  final)
    ( export CUDA_VISIBLE_DEVICES=0; full 560 ) &
    ( export CUDA_VISIBLE_DEVICES=1; quick 200; sweep 330; tune 560 --bwd-only ) &
    wait ;;
  last)
    ( export CUDA_VISIBLE_DEVICES=0; full 560 ) &
    ( export CUDA_VISIBLE_DEVICES=1
      gpu_tests 250 6 tests/test_jax_pallas.py tests/test_torch_pallas.py tests/test_jax_mgpu.py; sanitizer 320
      sweep 440; quick 560 ) &
    wait ;;
  quick)
    ( export CUDA_VISIBLE_DEVICES=0; quick 300 ) ;;
  mosaic)
    ( export CUDA_VISIBLE_DEVICES=0
      step mgpu_tests 150 python -m pytest -m gpu -q -p no:cacheprovider -rfE tests/test_jax_mgpu.py
      step tune_mgpu 500 python benchmarks/tune_mgpu.py --out "$out/tune_mgpu" ) &
    ( export CUDA_VISIBLE_DEVICES=1
      gpu_tests 200 6 tests/test_jax_pallas.py -k filtered
      step filtered 500 python benchmarks/bench.py --impls jax-pallas,jax-pallas-filtered,cce \
        --workloads gemma2-2b,llama3-8b --out "$out/filtered" ) &
    wait ;;
  *)
    echo "unknown part $part (checks, bench, final, last, quick, mosaic)" >&2; exit 2 ;;
esac
stamp done
tar czf /tmp/all.tgz -C "$out" . && mv /tmp/all.tgz "$out/all.tgz"  # one file: the return has a file-count limit
