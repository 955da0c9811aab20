#!/usr/bin/env bash
# The CPU targets of the README's Performance section, side by side with torchvision's reference:
#   bash bench/cpu_suite.sh OUT_DIR REFERENCE_DIR [VAL_IMAGES]
# evaluation wall time (`--test-only`, VAL_IMAGES images, default 100, at 800 px), its 24 numbers at full
# precision against the reference's (at 480-800 px, to save half an hour), and the training step at 800-1333 px,
# batch 2. Each benchmark's JSON line
# is appended to OUT_DIR/results.jsonl and each command's output kept in OUT_DIR/logs. Takes about 40 minutes
# on 2 cores; run it on a quiet machine, as the figures are wall times.
set -u
out=${1:?usage: cpu_suite.sh OUT_DIR REFERENCE_DIR [VAL_IMAGES]}
ref=${2:?usage: cpu_suite.sh OUT_DIR REFERENCE_DIR [VAL_IMAGES]}
val_images=${3:-100}
logs=$out/logs
mkdir -p "$out" "$logs"
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
export PYTHONUNBUFFERED=1
data=${DATA:-/tmp/cpu_suite_data}
model=${MODEL_DIR:-/tmp/cpu_suite_model}

step() {  # step NAME command...: run, log, keep going
  local name=$1; shift
  local t0=$(date +%s)
  "$@" >"$logs/$name.log" 2>&1
  local rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}" >>"$out/steps.jsonl"
  grep -h '^{"benchmark"' "$logs/$name.log" >>"$out/results.jsonl" || true
}

# ImageNet weights cannot be downloaded here: a ResNet-50 of random weights under torchvision's file name
# (speed does not depend on the values).
export TORCH_HOME=${TORCH_HOME:-/tmp/torch_home}
mkdir -p "$TORCH_HOME/hub/checkpoints"
$py -c "import torch, torchvision, sys; torch.save(torchvision.models.resnet50().state_dict(), sys.argv[1])" \
    "$TORCH_HOME/hub/checkpoints/resnet50-0676ba61.pth"
# COCO-like images (~640x480, ~7 shapes each) with COCO's category ids, so that the reference reads them.
$py tools/make_coco_dataset.py "$data" --coco-categories --coco-like --train-images 200 \
    --val-images "$val_images" >/dev/null
# A 91-class model trained briefly at a small size: detections that overlap the shapes, so the 24 numbers are
# not all zero. Its own epoch-end evaluation is at 160 px and not part of the figures.
step eval_model $py train.py --data-path "$data" --weights-backbone none --epochs 1 --batch-size 4 --lr 0.02 \
    --clip-grad-norm 10 --min-size 160 --max-size 267 -j 2 --device cpu --output-dir "$model" --print-freq 10
step eval_side_by_side $py bench/bench_eval.py --data-path "$data" --checkpoint "$model/checkpoint.pth" \
    --device cpu --workers 2 --reference "$ref"
step eval_parity $py bench/eval_parity.py --data-path "$data" --checkpoint "$model/checkpoint.pth" \
    --reference "$ref" --device cpu --workers 2 --min-size 480 --max-size 800
bt=(--data-path "$data" --device cpu --batch-size 2 --steps 6 --warmup 2 --workers 2
    --weights-backbone ResNet50_Weights.IMAGENET1K_V1)
step train_step $py bench/bench_train.py "${bt[@]}"
step ref_train_step $py bench/bench_train.py "${bt[@]}" --reference "$ref"
cat "$out/steps.jsonl"
