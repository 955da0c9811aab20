#!/usr/bin/env bash
# The CPU targets of the README's Performance section, side by side with torchvision's reference:
#   bash bench/cpu_suite.sh OUT_DIR REFERENCE_DIR [VAL_IMAGES]
# evaluation wall time (`--test-only`, VAL_IMAGES images, default 100, at 800 px; the two take turns ROUNDS times,
# default 3, as this machine's speed drifts within the hour), its 24 numbers at full precision against the
# reference's (at 480-800 px, to save half an hour), the training step at 800-1333 px, batch 2, and the mask
# predictor's cost at 91 and 1,204 classes (bench_mask_predictor.py) and the mask targets' (bench_mask_targets.py). Each
# benchmark's JSON line is appended to OUT_DIR/results.jsonl and each command's output kept in OUT_DIR/logs.
# Takes over an hour on 2 cores (ROUNDS=1 saves a third; docs/PERFORMANCE.md has the runs); run it on a quiet
# machine, as the figures are wall times.
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

SUITE_SECONDS=${SUITE_SECONDS:-7200} source bench/suite_lib.sh
# COCO-like images (sides of 440-640 px, ~7 shapes each) with COCO's category ids, so that the reference reads them.
$py tools/make_coco_dataset.py "$data" --coco-categories --coco-like --train-images 200 \
    --val-images "$val_images" >/dev/null
# A 91-class model trained briefly at a small size, with many low-score detections. Weak for parity: its 24
# numbers are near 0 (docs/PERFORMANCE.md; train it longer for a stronger check). Its own epoch-end evaluation is
# not a figure.
step eval_model 3600 $py train.py --data-path "$data" --weights-backbone none --epochs 1 --batch-size 4 --lr 0.02 \
    --clip-grad-norm 10 --min-size 160 --max-size 267 -j 2 --device cpu --output-dir "$model" --print-freq 10
step eval_side_by_side 5400 $py bench/bench_eval.py --data-path "$data" --checkpoint "$model/checkpoint.pth" \
    --device cpu --workers 2 --reference "$ref" --rounds "${ROUNDS:-3}"
step eval_parity 3600 $py bench/eval_parity.py --data-path "$data" --checkpoint "$model/checkpoint.pth" \
    --reference "$ref" --device cpu --workers 2 --min-size 480 --max-size 800
bt=(--data-path "$data" --device cpu --batch-size 2 --steps 6 --warmup 2 --workers 2
    --weights-backbone ResNet50_Weights.IMAGENET1K_V1)
step train_step 3600 $py bench/bench_train.py "${bt[@]}"
step ref_train_step 3600 $py bench/bench_train.py "${bt[@]}" --reference "$ref"
# The mask predictor with every class's logits and with the matched class's, in the CPU's channels-last layout.
for classes in 91 1204; do
  step mask_predictor_$classes 600 $py bench/bench_mask_predictor.py --regions 256 --classes $classes --channels-last
done
# The mask targets of an image of few instances and of a crowded one, torchvision's and cropped.
for instances in 3 200; do
  step mask_targets_$instances 300 $py bench/bench_mask_targets.py --instances $instances --regions 128
done
cat "$out/steps.jsonl"
