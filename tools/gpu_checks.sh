#!/usr/bin/env bash
# The checks and measurements that need a CUDA GPU, as two calls of at most 5 minutes each on
# one H100/H200, for a bare GPU machine: its own python3 and PyTorch (never installed here),
# the project from this checkout (PYTHONPATH), small missing packages as wheels in $WHEELS
# (tools/gpu_wheels.sh; only shards need them).
#
#   tools/gpu_checks.sh 1                        # call 1: does it work
#   tools/gpu_checks.sh 2                        # call 2: how fast
#   tools/gpu_checks.sh 1 pretrain               # some steps of a call (names below)
#   WHEELS=.whl RESULTS=/tmp/r STEP_TIMEOUT_SCALE=2 tools/gpu_checks.sh 1
#   ME_WHEELS=.mewheel tools/gpu_checks.sh 1 minkowski   # optional: ME's CUDA build (see below)
#   ALLOW_CPU=1 DRY_RUN=1 tools/gpu_checks.sh 1  # CPU dry run: eager instead of --compile, small sizes
#
# Results go to $RESULTS (default: $OUT if set, else gpu_results/), at most 8 files per call:
# environment.log, one log per step (written as it runs, so a timeout still returns what it
# measured) and summary.json (each step's status, seconds and numbers; rewritten after every
# step). A failed or timed-out step does not stop the others; exit 0 only if all passed.
#
# Estimated seconds on one H200 (from CPU-measured compile costs and earlier GPU runs of the
# same tools; the timeout is the estimate's upper end, and each call's timeouts sum to <= 300 s):
#
#   call step      what                                                    estimate  timeout
#   1    cuda      tests/test_cuda.py: sparse == masked-dense (fp32, bf16),  60-120     150
#                  compiled training step == eager (one graph, fp32 then bf16)
#   1    pretrain  fcmae-pretrain atto bf16 -> resume -> fcmae-convert --verify  30-60      80
#   1    triton    tests/test_dcnv3_triton.py -k cuda (JIT + autotune)      15-40       60
#   2    speed     tools/compile_check.py base bf16 (compile, eager vs       90-140     150
#                  compiled step), then tools/benchmark.py base: masked vs sparse (eager)
#   2    dcnv3     tools/dcnv3_bench.py: grid_sample vs Triton sampling     15-30       50
#   2    revcol    tools/revcol_memory.py: reversible vs plain peak memory  10-20       30
#   2    loader    tools/loader_bench.py: folder vs shards at 4/8 workers   30-60       70
set -u
cd "$(dirname "$0")/.."
CALL=${1:-}
shift || true
case "$CALL" in
  1|2) ;;
  *) echo "usage: tools/gpu_checks.sh 1|2 [step ...]   (1: does it work, 2: how fast)" >&2; exit 2 ;;
esac
RESULTS=${RESULTS:-${OUT:-gpu_results}}
SCALE=${STEP_TIMEOUT_SCALE:-1}
PY=${PYTHON:-python3}
WORK=$(mktemp -d)                 # checkpoints and scratch data: never copied back
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$RESULTS"

if [ -n "${WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="$WORK/site:${PYTHONPATH:-}"
fi
# Optional, call 1: MinkowskiEngine built with CUDA for sm_90 here (tools/check_minkowski_cuda.sh
# with ME_WHEEL_DIR=.mewheel; a cp312 wheel for torch 2.11+cu130), carried: one more step runs
# the minkowski backend's parity tests, on cuda too (its timeout is outside the 300 s budget).
if [ -n "${ME_WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$ME_WHEELS"/[Mm]inkowski[Ee]ngine-*.whl || exit 1
  export PYTHONPATH="$WORK/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

# A dry run on CPU checks that every command runs, at sizes a CPU finishes: eager instead of
# --compile, small models and batches.
if [ -n "${DRY_RUN:-}" ]; then
  DEVICE=cpu; EAGER=--no-compile; BASE=convnextv2_atto; BATCH=4; SIZE=64; IMAGES=64; WORKERS=2
  COLLECT=--co   # the CUDA tests skip without a GPU: check that they import and collect
else
  DEVICE=cuda; EAGER=""; BASE=convnextv2_base; BATCH=64; SIZE=224; IMAGES=2048; WORKERS=4,8
  COLLECT=""
fi

# name | timeout (s) | command; a command may write $WORK/<name>.json, folded into the summary
if [ "$CALL" = 1 ]; then
  STEPS=(
    "cuda|150|$PY -m pytest -q -p no:cacheprovider tests/test_cuda.py $COLLECT"
    "pretrain|80|pretrain_end_to_end"
    "triton|60|$PY -m pytest -q -p no:cacheprovider tests/test_dcnv3_triton.py -k cuda $COLLECT"
  )
  [ -n "${ME_WHEELS:-}" ] && STEPS+=(
    "minkowski|90|FCMAE_REQUIRE_MINKOWSKI=1 $PY -m pytest -q -p no:cacheprovider tests/test_minkowski.py"
  )
else
  STEPS=(
    "speed|150|$PY tools/compile_check.py --model $BASE --device $DEVICE --dtype bf16 --batch-size $BATCH --input-size $SIZE --iters 5 $EAGER --json $WORK/speed.json && $PY tools/benchmark.py --model $BASE --variants masked,sparse-torch --batch-size $BATCH --input-size $SIZE --device $DEVICE --dtype bf16 --iters 5 --json $WORK/speed-eager.json"
    "dcnv3|50|$PY tools/dcnv3_bench.py --device $DEVICE --dtype bf16 --batch-size $BATCH --input-size $SIZE"
    "revcol|30|$PY tools/revcol_memory.py --device $DEVICE --batch-size 8 --input-size $SIZE"
    "loader|70|$PY tools/loader_bench.py --workers $WORKERS --batch-size $BATCH --num-images $IMAGES --input-size $SIZE --device $DEVICE --amp bf16 --json $WORK/loader.json"
  )
fi

# fcmae-pretrain (bf16) on synthetic images, resumed once, then converted with --verify.
pretrain_end_to_end() {
  local run="$WORK/pretrain" common amp
  $PY - "$WORK/images" <<'EOF' || return 1
import sys, numpy as np
from pathlib import Path
from PIL import Image
folder = Path(sys.argv[1]); folder.mkdir(parents=True)
rng = np.random.default_rng(0)
for index in range(96):
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize((256, 256)).save(folder / f"{index}.png")
EOF
  amp=bf16; [ "$DEVICE" = cpu ] && amp=none
  common=(--data-path "$WORK/images" --model convnextv2_atto --amp "$amp" --device "$DEVICE" --batch-size 32
          --input-size "$SIZE" --steps-per-epoch 3 --num-workers 4 --output-dir "$run" --vis-every 2)
  $PY -m fcmae.cli.pretrain "${common[@]}" --epochs 1 \
    && $PY -m fcmae.cli.pretrain "${common[@]}" --epochs 2 --resume auto \
    && $PY -c "import torch, sys; c = torch.load(sys.argv[1], weights_only=True); assert c['epoch'] == 1 and c['step'] == 6, (c['epoch'], c['step'])" "$run/checkpoint-last.pth" \
    && $PY -m fcmae.cli.convert "$run/checkpoint-last.pth" -o "$run/dense.pth" --verify
}

write_summary() {
  $PY - "$WORK" "$RESULTS/summary.json" "$CALL" <<'EOF'
import json, sys
from pathlib import Path
work, summary = Path(sys.argv[1]), {"call": int(sys.argv[3]), "steps": {}}
for line in (work / "steps.tsv").read_text().splitlines() if (work / "steps.tsv").exists() else []:
    name, result, seconds = line.split("\t")
    numbers = {path.stem: json.loads(path.read_text()) for path in sorted(work.glob(f"{name}*.json"))}
    summary["steps"][name] = {"result": result, "seconds": int(seconds), "numbers": numbers or None}
Path(sys.argv[2]).write_text(json.dumps(summary, indent=2))
EOF
}

$PY - <<'EOF' > "$RESULTS/environment.log" 2>&1
import importlib, os, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE", "cpus", os.cpu_count())
for name in ("torchvision", "timm", "einops", "tqdm", "tensorboard", "safetensors", "skimage", "pytest", "triton",
             "numpy", "webdataset"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except ImportError:
        print(name, "MISSING" + (": only shards need it (tools/gpu_wheels.sh)" if name == "webdataset" else ""))
EOF
cat "$RESULTS/environment.log"
if grep -q "NO CUDA DEVICE" "$RESULTS/environment.log" && [ -z "${ALLOW_CPU:-}" ]; then
  echo "gpu_checks: PyTorch sees no CUDA device; nothing to check (ALLOW_CPU=1 DRY_RUN=1 for a dry run)" >&2
  exit 1
fi

selected=("$@")
status=0
for entry in "${STEPS[@]}"; do
  IFS='|' read -r name limit command <<< "$entry"
  if [ ${#selected[@]} -gt 0 ] && [[ ! " ${selected[*]} " == *" $name "* ]]; then continue; fi
  limit=$((limit * SCALE))
  echo "== call $CALL: $name (timeout ${limit}s): $command"
  start=$SECONDS
  if [ "$command" = pretrain_end_to_end ]; then
    export -f pretrain_end_to_end; export PY WORK DEVICE SIZE
    timeout -k 10 "$limit" bash -c pretrain_end_to_end > "$RESULTS/$name.log" 2>&1
  else
    timeout -k 10 "$limit" bash -c "$command" > "$RESULTS/$name.log" 2>&1
  fi
  code=$?
  result=ok; [ $code -eq 124 ] && result=timeout; [ $code -ne 0 ] && [ $code -ne 124 ] && result=failed
  [ $code -ne 0 ] && status=1
  echo "   $result in $((SECONDS - start)) s; last lines:"
  tail -n 8 "$RESULTS/$name.log" | sed 's/^/   /'
  printf '%s\t%s\t%s\n' "$name" "$result" "$((SECONDS - start))" >> "$WORK/steps.tsv"
  write_summary
done
write_summary
echo "summary: $(tr -d '\n ' < "$RESULTS/summary.json" | head -c 400)"
exit $status
