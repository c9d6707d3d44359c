#!/usr/bin/env bash
# Every measurement and check that needs a CUDA GPU, in one run, each step's output in its
# own log under RESULTS (default: $OUT if set, else gpu_results/). Steps are independent:
# one failing does not stop the others; the exit status says whether all passed.
#
#   tools/gpu_checks.sh                  # all steps
#   tools/gpu_checks.sh dcnv3 internimage  # some steps (names below)
set -u
RESULTS=${RESULTS:-${OUT:-gpu_results}}
mkdir -p "$RESULTS"
declare -A STEPS=(
  [tests]="python -m pytest -q tests/test_dcnv3_triton.py tests/test_internimage.py tests/test_fcmae.py"
  [convnext]="python tools/benchmark.py --model convnextv2_base --batch-size 128 --device cuda --dtype bf16 --compile"
  [dcnv3]="python tools/dcnv3_bench.py --device cuda --dtype bf16 --batch-size 64"
  [internimage]="python tools/benchmark.py --model internimage_t --batch-size 64 --device cuda --dtype bf16"
  [revcol]="python tools/revcol_memory.py --device cuda --batch-size 8"
)
ORDER=(tests convnext dcnv3 internimage revcol)
[ $# -gt 0 ] && ORDER=("$@")
status=0
for step in "${ORDER[@]}"; do
  command=${STEPS[$step]:?unknown step $step (one of ${!STEPS[*]})}
  echo "== $step: $command"
  start=$SECONDS
  if $command > "$RESULTS/$step.log" 2>&1; then result=ok; else result=FAILED; status=1; fi
  echo "   $result in $((SECONDS - start)) s; last lines:"
  tail -n 8 "$RESULTS/$step.log" | sed 's/^/   /'
done
exit $status
