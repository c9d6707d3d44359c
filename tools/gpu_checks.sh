#!/usr/bin/env bash
# Every check and measurement that needs a CUDA GPU, in one run of at most ~8 minutes on one
# H100, most valuable first. Made for a bare GPU machine: its own python3 and PyTorch (>= the
# lowest supported version); this script never installs torch. The project runs from this
# checkout (PYTHONPATH); small missing packages may come as wheels in $WHEELS.
#
#   tools/gpu_checks.sh                   # every step
#   tools/gpu_checks.sh tests pretrain    # some steps (names below)
#   WHEELS=.whl RESULTS=/tmp/r STEP_TIMEOUT_SCALE=2 tools/gpu_checks.sh
#   ALLOW_CPU=1 PRETRAIN_FLAGS=--amp=bf16 tools/gpu_checks.sh tests pretrain   # dry run on CPU
#
# Results go to $RESULTS (default: $OUT if set, else gpu_results/): one log per step and
# summary.json (each step's status, seconds, and the numbers it measured). A step that fails or
# runs past its timeout does not stop the others; the exit status is 0 only if all passed.
set -u
cd "$(dirname "$0")/.."
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
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

# name | timeout (s) | command; each command may write $WORK/<name>.json, folded into the summary
STEPS=(
  "tests|90|$PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_dcnv3_triton.py -k cuda"
  "pretrain|100|pretrain_end_to_end"
  "speed|140|$PY tools/benchmark.py --model convnextv2_base --batch-size 128 --device cuda --dtype bf16 --compile --json $WORK/speed.json"
  "dcnv3|60|$PY tools/dcnv3_bench.py --device cuda --dtype bf16 --batch-size 64 && $PY tools/benchmark.py --model internimage_t --batch-size 64 --device cuda --dtype bf16 --json $WORK/dcnv3.json"
  "revcol|30|$PY tools/revcol_memory.py --device cuda --batch-size 8"
  "loader|60|$PY tools/loader_bench.py --workers 4,8 --batch-size 64 --num-images 2048 --device cuda --amp bf16 --json $WORK/loader.json"
)

# fcmae-pretrain on CUDA (bf16, compiled) on synthetic images, resumed once, then converted with --verify.
pretrain_end_to_end() {
  local run="$WORK/pretrain" common
  $PY - "$WORK/images" <<'EOF' || return 1
import sys, numpy as np
from pathlib import Path
from PIL import Image
folder = Path(sys.argv[1]); folder.mkdir(parents=True)
rng = np.random.default_rng(0)
for index in range(96):
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize((256, 256)).save(folder / f"{index}.png")
EOF
  # shellcheck disable=SC2206  # PRETRAIN_FLAGS is a list of flags
  common=(--data-path "$WORK/images" --model convnextv2_atto ${PRETRAIN_FLAGS:---amp bf16 --compile} --batch-size 32
          --steps-per-epoch 3 --num-workers 4 --output-dir "$run" --vis-every 2)
  $PY -m fcmae.cli.pretrain "${common[@]}" --epochs 1 \
    && $PY -m fcmae.cli.pretrain "${common[@]}" --epochs 2 --resume auto \
    && $PY -c "import torch, sys; c = torch.load(sys.argv[1], weights_only=True); assert c['epoch'] == 1 and c['step'] == 6, (c['epoch'], c['step'])" "$run/checkpoint-last.pth" \
    && $PY -m fcmae.cli.convert "$run/checkpoint-last.pth" -o "$run/dense.pth" --verify
}

$PY - <<'EOF' > "$RESULTS/environment.log" 2>&1
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
for name in ("torchvision", "timm", "einops", "tqdm", "tensorboard", "safetensors", "skimage", "pytest", "triton"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except ImportError:
        print(name, "MISSING: bring it as a wheel in $WHEELS")
EOF
cat "$RESULTS/environment.log"
if grep -q "NO CUDA DEVICE" "$RESULTS/environment.log" && [ -z "${ALLOW_CPU:-}" ]; then
  echo "gpu_checks: PyTorch sees no CUDA device; nothing to check (ALLOW_CPU=1 for a dry run)" >&2
  exit 1
fi

selected=("$@")
status=0
for entry in "${STEPS[@]}"; do
  IFS='|' read -r name limit command <<< "$entry"
  if [ ${#selected[@]} -gt 0 ] && [[ ! " ${selected[*]} " == *" $name "* ]]; then continue; fi
  limit=$((limit * SCALE))
  echo "== $name (timeout ${limit}s): $command"
  start=$SECONDS
  if [ "$command" = pretrain_end_to_end ]; then
    export -f pretrain_end_to_end; export PY WORK PRETRAIN_FLAGS
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
done

$PY - "$WORK" "$RESULTS/summary.json" <<'EOF'
import json, sys
from pathlib import Path
work, summary = Path(sys.argv[1]), {}
for line in (work / "steps.tsv").read_text().splitlines() if (work / "steps.tsv").exists() else []:
    name, result, seconds = line.split("\t")
    numbers = work / f"{name}.json"
    summary[name] = {"result": result, "seconds": int(seconds),
                     "numbers": json.loads(numbers.read_text()) if numbers.exists() else None}
Path(sys.argv[2]).write_text(json.dumps(summary, indent=2))
print("summary:", {name: step["result"] for name, step in summary.items()})
EOF
exit $status
