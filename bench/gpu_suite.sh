#!/usr/bin/env bash
# The GPU checks behind the README's Performance section, in one call, in order of importance:
#   bash bench/gpu_suite.sh OUT_DIR [REFERENCE_DIR] [all|train|eval|table]
# REFERENCE_DIR is torchvision's references/detection, measured beside ours where given. One figure for each
# target comes first (training images/s with --amp on mixed-size and on one-size data, ours and the reference;
# the profile's host and GPU time per step; evaluation wall time), then the table of images/s and peak memory
# at batch 2, 4, 8 and 16 per GPU (fp32 and --amp), then the rest; the suite ends after SUITE_SECONDS (540) and
# skips the steps left, which `train`, `eval` or `table` runs in a later call (each only its own steps). Each
# benchmark's JSON line is appended to OUT_DIR/results.jsonl, each command's output kept in
# OUT_DIR/logs.tar.gz, the training profiles (operator tables and traces of a few steps) written to OUT_DIR.
# Wheels in .whl/ (pycocotools, faster-coco-eval, msgspec: `bash bench/gpu_wheels.sh` downloads them here) are
# installed first, for a machine without them. On the device tool's machine: copy references/detection into .ref/
# (ignored by git), carry .whl and .ref, and run `bash bench/gpu_suite.sh $OUT .ref/detection` with a 600 s limit.
set -u
out=${1:?usage: gpu_suite.sh OUT_DIR [REFERENCE_DIR] [all|train|eval|table]}
ref=${2:-}
part=${3:-all}
case $part in
  all|train|eval|table) ;;
  *) echo "gpu_suite.sh: no part '$part': give all, train, eval or table" >&2; exit 2;;
esac
logs=$out/logs
mkdir -p "$out" "$logs"
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

source bench/suite_lib.sh
wants() { [ "$part" = all ] || [ "$part" = "$1" ]; }

# A small set for the seed's commands, and a COCO-like one (sides of 440-640 px, ~7 shapes) for the benchmarks; both use
# COCO's own category ids so that torchvision's reference (91 classes, labels = ids) reads them too.
[ "$part" = all ] && $py tools/make_coco_dataset.py datasets/coco --coco-categories --coco-like --train-images 64 \
    --val-images 16 >/dev/null &
val_images=16
wants eval && val_images=500
# And one whose images all have one size (480 x 480): every batch the same shape, as cuDNN's plan cache sees
# a long run whose batch shapes have all been seen.
wants train && $py tools/make_coco_dataset.py /tmp/oneshape --coco-categories --coco-like --size 480 \
    --train-images 120 --val-images 4 >/dev/null &
# 240 training images: batch 16's 12 steps (warm-up, timed, one more) need 192 usable ones.
$py tools/make_coco_dataset.py /tmp/cocolike --coco-categories --coco-like --train-images 240 \
    --val-images $val_images >/dev/null
wait

# In order of importance: the steps left when the time is up are skipped.
bt=(--data-path /tmp/cocolike --device cuda --batch-size 4 --steps 20 --warmup 5 --workers 8
    --weights-backbone ResNet50_Weights.IMAGENET1K_V1)
one=("${bt[@]}" --data-path /tmp/oneshape)
pt=("${bt[@]}" --steps 4 --warmup 4 --amp --profile "$out")
if wants train; then
  step train_fp16 90 $py bench/bench_train.py "${bt[@]}" --amp --amp-dtype float16
  [ -n "$ref" ] && step ref_train_fp16 90 $py bench/bench_train.py "${bt[@]}" --amp --reference "$ref"
  step oneshape_fp16 90 $py bench/bench_train.py "${one[@]}" --amp --amp-dtype float16
  [ -n "$ref" ] && step ref_oneshape_fp16 90 $py bench/bench_train.py "${one[@]}" --amp --reference "$ref"
  step profile_fp16 90 $py bench/bench_train.py "${pt[@]}" --amp-dtype float16
fi
if wants eval; then
  # A 91-class model in the layout both builders make without ImageNet weights, trained briefly: its many
  # low-score detections are the worst case for evaluation. Its own epoch-end evaluation is ours at batch 1.
  step eval_model 150 $py train.py --data-path /tmp/cocolike --weights-backbone none --epochs 1 --batch-size 8 \
      --lr 0.02 --clip-grad-norm 10 --amp --amp-dtype bfloat16 -j 8 --output-dir /tmp/evalmodel --print-freq 10
  step eval_side_by_side 240 $py bench/bench_eval.py --data-path /tmp/cocolike \
      --checkpoint /tmp/evalmodel/checkpoint.pth --workers 8 ${ref:+--reference "$ref"}
fi
if wants train || wants table; then  # batch 4 of the table (its --amp pair is train_fp16's)
  step train_fp32 90 $py bench/bench_train.py "${bt[@]}"
  [ -n "$ref" ] && step ref_train_fp32 90 $py bench/bench_train.py "${bt[@]}" --reference "$ref"
fi
if wants table; then
  for batch in 2 8 16; do
    tb=("${bt[@]}" --batch-size $batch --steps 8 --warmup 3)
    step table_b${batch}_fp16 75 $py bench/bench_train.py "${tb[@]}" --amp --amp-dtype float16
    [ -n "$ref" ] && step ref_table_b${batch}_fp16 75 $py bench/bench_train.py "${tb[@]}" --amp --reference "$ref"
    step table_b${batch}_fp32 75 $py bench/bench_train.py "${tb[@]}"
    [ -n "$ref" ] && step ref_table_b${batch}_fp32 75 $py bench/bench_train.py "${tb[@]}" --reference "$ref"
  done
fi
if wants train; then
  [ -n "$ref" ] && step ref_profile_fp16 90 $py bench/bench_train.py "${pt[@]}" --reference "$ref"
  step train_fp16_unbucketed 90 $py bench/bench_train.py "${bt[@]}" --amp --amp-dtype float16 --no-shape-buckets
  step train_bf16 90 $py bench/bench_train.py "${bt[@]}" --amp --amp-dtype bfloat16
  # The mask predictor's cost with every class's logits and with the matched class's, at COCO's 91 classes and
  # LVIS's 1,204, for a batch of 4 at 128 positive regions an image.
  step mask_predictor_coco 60 $py bench/bench_mask_predictor.py --device cuda --regions 512 --classes 91
  step mask_predictor_lvis 60 $py bench/bench_mask_predictor.py --device cuda --regions 512 --classes 1204
fi
if wants eval; then
  step eval_unbucketed 120 $py bench/bench_eval.py --data-path /tmp/cocolike \
      --checkpoint /tmp/evalmodel/checkpoint.pth --workers 8 -- --no-shape-buckets
  step eval_batched 120 $py bench/bench_eval.py --data-path /tmp/cocolike --checkpoint /tmp/evalmodel/checkpoint.pth \
      --workers 8 -- --eval-batch-size 8
  [ -n "$ref" ] && step eval_parity 240 $py bench/eval_parity.py --data-path /tmp/cocolike \
      --checkpoint /tmp/evalmodel/checkpoint.pth --reference "$ref" --workers 8
fi
if [ "$part" = all ]; then
  seed=(--data-path ./datasets/coco --dataset coco --model maskrcnn_resnet50_fpn)
  step seed_amp 90 $py train.py "${seed[@]}" --lr 0.001 --batch-size 1 --amp --epochs 1 --output-dir /tmp/o2 \
      --print-freq 16
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$logs/gpu.txt" 2>&1
tar -czf "$out/logs.tar.gz" -C "$out" logs && rm -r "$logs"
cat "$out/steps.jsonl"
