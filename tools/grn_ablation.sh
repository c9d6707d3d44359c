#!/usr/bin/env bash
# The ConvNeXt V2 paper's GRN ablation on the built-in demo photos: FCMAE-pretrain ConvNeXt V1
# (no GRN) and V2 (GRN) atto under one recipe and budget (the two runs side by side, one CPU
# thread each), then the feature-collapse analysis of both and of both at random init, in one
# plot.  Usage: tools/grn_ablation.sh [EPOCHS] [OUT]
set -euo pipefail
epochs=${1:-40}
out=${2:-output/grn_ablation}
mkdir -p "$out"
for model in convnext_atto convnextv2_atto; do
  fcmae-pretrain --model "$model" --epochs "$epochs" --seed 0 --num-workers 0 --threads 1 --vis-every 0 \
    --output-dir "$out/$model" --resume auto > "$out/$model.log" 2>&1 &
done
wait
fcmae-analyze "V1 FCMAE=$out/convnext_atto/checkpoint-last.pth" "V2 FCMAE=$out/convnextv2_atto/checkpoint-last.pth" \
  "V1 random=random:convnext_atto" "V2 random=random:convnextv2_atto" \
  -o "$out/collapse.png" --feature-maps stages.2.3 --channels 32
