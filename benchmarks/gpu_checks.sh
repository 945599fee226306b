#!/usr/bin/env bash
# The checks of the GPU machine, by target, from the repository root:
#
#   bash benchmarks/gpu_checks.sh OUTDIR TARGET [TARGET ...]
#
# Targets (run in the order given; an unknown one stops the call before anything runs):
#   peers     install the peer wheels carried in .whl/ into the site (PEER_SITE, default
#             /tmp/peers/site-packages) in one pip call: cut-cross-entropy, liger-kernel, nvidia-cutlass-dsl with
#             its -libs-base and -libs-core wheels, apache-tvm-ffi, quack-kernels (a second pip --target into an
#             existing nvidia_cutlass_dsl/ silently skips files). Then the CuTe DSL's CUDA 13 wheel
#             (nvidia-cutlass-dsl-libs-cu13, too big for one call's tree) unpacked over it from an xz tar in two
#             halves: part_aa (in .cu13a/, or copied to CU13_STASH, default /tmp/cu13-parts, by an earlier call
#             on the same warm machine) and part_ab with cu13.tar.xz.sha256 (in .cu13b/). Then an import check of
#             each peer (peers-check.log). The site's path must hold a folder named site-packages: QuACK
#             fingerprints only code outside such folders and fails at import on the DSL's globals otherwise.
#             The wheels of a folder .whl/NAME/ go to /tmp/peers-NAME/site-packages, for a peer that needs other
#             versions (PEER_SITE=/tmp/peers-NAME/site-packages then selects that site). It runs first, whatever
#             the targets, when .whl/ exists and the site does not, and once per call.
#   tests     the GPU tests: pytest -m "gpu and not large", then -m "gpu and large"
#   bench     python -m benchmarks.bench, both workloads and regimes -> OUTDIR/bench-h200.json, and
#             OUTDIR/benchmarks.md rendered from it (with OUTDIR/bench-h200-sweep.json if the sweep ran first).
#             With two GPUs visible, one workload per GPU at the same time (the whole run takes longer than
#             one device call allows), merged into one file; with one, the workloads one after the other.
#   sweep     the vocabulary sweep -> OUTDIR/bench-h200-sweep.json
#   quick     python -m benchmarks.bench --quick -> OUTDIR/bench-quick.json (its wall time: the ~1 min check)
#   compare   the headline rows of this tree and of the checkout at COMPARE_TREE, in the same run
#             -> OUTDIR/compare.json and OUTDIR/compare.md
#   tune      python -m benchmarks.tune_pallas --bwd, then python -m benchmarks.tune_mosaic
#   sanitize  compute-sanitizer memcheck over python -m benchmarks.sanitize_pallas, one process per case
#             (SANITIZE_ONLY: its parts, default all; SANITIZE_MATCH: only the cases
#             whose name contains it), a case the tool crashes on run
#             again up to SANITIZE_ATTEMPTS (default 3) times -> OUTDIR/sanitize-cases.txt (compute-sanitizer
#             2025.3.1 ends with a segmentation fault, intermittently, in some runs of a few seconds)
#   profile   python -m benchmarks.profile_kernels: the kernels of one forward+backward of the rows in
#             PROFILE_IMPLS (default: floor and our exact and mean rows), both workloads -> OUTDIR/profile.json
#   parallel  the 2-GPU vocabulary-parallel parity and timing -> OUTDIR/vocab_parallel/
#
# Environment: GPU (default 0) is the GPU of every target except parallel and a two-GPU bench
# (CUDA_VISIBLE_DEVICES); STEP_LIMIT (default 570) the seconds each step may run; WORKERS (default 4) the
# pytest-xdist workers of `tests` where xdist is installed. Each step writes OUTDIR/STEP.log and a line to
# OUTDIR/timeline.txt (exit status, wall time), so one failure or overrun does not lose the others; the call
# exits with 1 if any of its steps failed. Two one-GPU lists at once, e.g.:
#
#   GPU=0 bash benchmarks/gpu_checks.sh out/0 quick tune & GPU=1 bash benchmarks/gpu_checks.sh out/1 sweep tests & wait
set -u
usage() { sed -n '2,/^set -u/p' "$0" | sed 's/^# \{0,1\}//; /^set -u/d' >&2; exit 2; }
[ $# -ge 2 ] || usage
out=$1
shift
targets=" peers tests bench sweep quick compare tune sanitize profile parallel "
for t in "$@"; do
  case "$targets" in *" $t "*) ;; *) echo "unknown target '$t' (known:$targets)" >&2; exit 2 ;; esac
done
mkdir -p "$out"

site=${PEER_SITE:-/tmp/peers/site-packages}
stash=${CU13_STASH:-/tmp/cu13-parts}
limit=${STEP_LIMIT:-570}
start=$(date +%s)
seen=$(cat "$out/timeline.txt" 2> /dev/null | wc -l)  # lines of earlier calls into the same OUTDIR
stamp() { echo "$(( $(date +%s) - start )) s: $*" | tee -a "$out/timeline.txt"; }

# step NAME CMD...: CMD with at most $limit seconds, output in OUTDIR/NAME.log.
step() {
  local name=$1 s rc
  shift
  s=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  stamp "$name rc=$rc wall $(( $(date +%s) - s )) s"
  return $rc
}

# The halves of the CUDA 13 tar joined, checked against the digest and unpacked into the site (python, not xz:
# the machine need not have it). Arguments: SITE SHA256_FILE PART...
unpack_cu13='
import hashlib, io, sys, tarfile
site, digest, *parts = sys.argv[1:]
data = b"".join(open(p, "rb").read() for p in parts)
want, got = open(digest).read().split()[0], hashlib.sha256(data).hexdigest()
if got != want:
    sys.exit(f"the joined halves {parts} do not match {digest}: sha256 {got}, want {want}")
with tarfile.open(fileobj=io.BytesIO(data), mode="r:xz") as tar:
    names = [m.name for m in tar.getmembers() if m.isfile()]
    tar.extractall(site, filter="data")
print(f"{len(names)} files ({len(data)} bytes of xz) unpacked into {site}")
'

# cu13: the CuTe DSL CUDA 13 wheel's files into the site, from the halves wherever they are; none at all is no error
# (the DSL then stays without its CUDA 13 libraries and its peers report that at import).
cu13() {
  local name p found parts=() digest=
  for p in .cu13b/cu13.tar.xz.sha256 .cu13a/cu13.tar.xz.sha256 "$stash/cu13.tar.xz.sha256"; do
    [ -f "$p" ] && { digest=$p; break; }
  done
  for name in part_aa part_ab; do
    found=
    for p in ".cu13a/$name" ".cu13b/$name" "$stash/$name"; do
      [ -f "$p" ] && { found=$p; break; }
    done
    [ -n "$found" ] && parts+=("$found")
  done
  if [ ${#parts[@]} -eq 0 ] && [ -z "$digest" ]; then
    stamp "peers: no CuTe DSL CUDA 13 tar in .cu13a/, .cu13b/ or $stash/"
    return 0
  fi
  if [ ${#parts[@]} -ne 2 ] || [ -z "$digest" ]; then
    stamp "peers-cu13 rc=1: found '${parts[*]:-}' and digest '$digest', need part_aa, part_ab and" \
      "cu13.tar.xz.sha256 (an earlier call on this warm machine: mkdir -p $stash && cp .cu13a/part_aa $stash/)"
    return 1
  fi
  step peers-cu13 python3 -c "$unpack_cu13" "$site" "$digest" "${parts[@]}"
}

peer_check='
import importlib, sys
failed = 0
for module in sys.argv[1:]:
    try:
        importlib.import_module(module)
        print(f"ok   {module}")
    except Exception as exc:
        failed += 1
        print(f"FAIL {module}: {type(exc).__name__}: {exc}"[:400])
sys.exit(1 if failed else 0)
'

peers_done=0
peers() {
  local sub
  [ "$peers_done" = 1 ] && return 0
  peers_done=1
  if ! ls .whl/*.whl > /dev/null 2>&1; then stamp "peers: no wheels in .whl/"; return 0; fi
  step peers python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl || return 1
  cu13  # after pip: pip --upgrade replaces the whole nvidia_cutlass_dsl/ folder
  step peers-check env PYTHONPATH="$site/nvidia_cutlass_dsl/dsl_packages:$site:$PWD" python3 -c "$peer_check" \
    cut_cross_entropy liger_kernel.transformers.functional cutlass.cute \
    liger_kernel.ops.cutedsl.ops.fused_linear_cross_entropy_sm90 quack.linear_cross_entropy
  for sub in .whl/*/; do
    [ -d "$sub" ] || continue
    step "peers-$(basename "$sub")" python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "/tmp/peers-$(basename "$sub")/site-packages" "$sub"*.whl
  done
}

if [ -d .whl ] && [ ! -d "$site" ]; then peers; fi
# The CuTe DSL's packages are found through a .pth file, which a --target folder does not read.
PYTHONPATH=$site:$PWD
[ -d "$site/nvidia_cutlass_dsl/dsl_packages" ] && PYTHONPATH=$site/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH
export PYTHONPATH XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > "$out/gpus.csv" 2>&1

report() {  # report BENCH_JSON MD: the markdown of a result file, beside it
  step "report-$(basename "$2" .md)" python -m benchmarks.report --bench "$1" --sweep "$out/bench-h200-sweep.json" \
    --parallel "" --out "$2"
}

one_gpu() {
  local target=$1
  export CUDA_VISIBLE_DEVICES=${GPU:-0}
  case "$target" in
    peers) peers ;;
    tests)
      local xdist=()
      python -c "import xdist" 2> /dev/null && xdist=(-n "${WORKERS:-4}")
      step tests python -m pytest -m "gpu and not large" -q -p no:cacheprovider -rfE ${xdist[@]+"${xdist[@]}"}
      step tests-large python -m pytest -m "gpu and large" -q -p no:cacheprovider -rfE ;;
    bench)
      local wl parts=() gpus
      gpus=$(nvidia-smi -L 2> /dev/null | wc -l)
      for wl in gemma2-2b llama3-8b; do
        parts+=("$out/bench-$wl.json")
        if [ "$gpus" -ge 2 ]; then
          ( export CUDA_VISIBLE_DEVICES=$(( ${#parts[@]} - 1 ))
            step "bench-$wl" python -m benchmarks.bench --workloads "$wl" --out "$out/bench-$wl.json" ) &
        else
          step "bench-$wl" python -m benchmarks.bench --workloads "$wl" --out "$out/bench-$wl.json"
        fi
      done
      wait
      step bench-merge python -m benchmarks.bench --merge "${parts[@]}" --out "$out/bench-h200.json" &&
        report "$out/bench-h200.json" "$out/benchmarks.md" ;;
    sweep) step sweep python -m benchmarks.bench --workloads none --sweep --out "$out/bench-h200-sweep.json" ;;
    quick) step quick python -m benchmarks.bench --quick --out "$out/bench-quick.json" ;;
    compare)
      if [ -z "${COMPARE_TREE:-}" ]; then
        stamp "compare rc=2: set COMPARE_TREE to the checkout to compare with"
        return 2
      fi
      step compare python -m benchmarks.bench --workloads none --compare-tree "$COMPARE_TREE" \
        --out "$out/compare.json" && report "$out/compare.json" "$out/compare.md" ;;
    tune)
      step tune-pallas python -m benchmarks.tune_pallas --bwd
      step tune-mosaic python -m benchmarks.tune_mosaic --out "$out" ;;
    sanitize)
      # One process per case; a case whose run the tool ends with a segmentation fault (139) is run again, up
      # to SANITIZE_ATTEMPTS times; a memory error makes the tool exit with 97.
      local names=() i=0 k rc
      mapfile -t names < <(python -m benchmarks.sanitize_pallas --list ${SANITIZE_ONLY:+--only $SANITIZE_ONLY} \
        ${SANITIZE_MATCH:+--match "$SANITIZE_MATCH"})
      for name in "${names[@]}"; do
        i=$(( i + 1 ))
        for k in $(seq "${SANITIZE_ATTEMPTS:-3}"); do
          step "sanitize-$i.$k" compute-sanitizer --tool memcheck --target-processes all --print-limit 20 \
            --error-exitcode 97 python -m benchmarks.sanitize_pallas ${SANITIZE_ONLY:+--only $SANITIZE_ONLY} \
            --match "$name"
          rc=$?
          echo "sanitize-$i.$k rc=$rc: $name" >> "$out/sanitize-cases.txt"
          [ $rc -eq 139 ] || break
        done
      done ;;
    profile)
      step profile python -m benchmarks.profile_kernels --workloads gemma2-2b,llama3-8b --out "$out/profile.json" \
        --impls "${PROFILE_IMPLS:-floor,jax-pallas,jax-pallas-softcap,jax-pallas-mean}" ;;
  esac
}

for target in "$@"; do
  if [ "$target" = parallel ]; then
    ( unset CUDA_VISIBLE_DEVICES
      step parallel python -m benchmarks.vocab_parallel_gpu --skip-chunked --timeout "$(( limit - 30 ))" \
        --out "$out/vocab_parallel" )
  else
    ( one_gpu "$target" )
  fi
done
stamp done
# The exit status: 1 if any step of this call failed.
! tail -n +"$(( seen + 1 ))" "$out/timeline.txt" | grep -q ' rc=[1-9]'
