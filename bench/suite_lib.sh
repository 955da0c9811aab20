# Shared by gpu_suite.sh and cpu_suite.sh (sourced after they set out, logs and py).
deadline=$(( $(date +%s) + ${SUITE_SECONDS:-540} ))  # the whole suite ends by then; later steps are skipped
step() {  # step NAME SECONDS command...: run, log, never stop the suite
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  local left=$(( deadline - t0 ))
  if [ "$left" -lt 20 ]; then
    echo "{\"step\": \"$name\", \"rc\": \"skipped\"}" >>"$out/steps.jsonl"; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout "$limit" "$@" >"$logs/$name.log" 2>&1
  local rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}" >>"$out/steps.jsonl"
  grep -h '^{"benchmark"' "$logs/$name.log" >>"$out/results.jsonl" || true
}

# ImageNet weights cannot be downloaded here: where the hub cache has none, a ResNet-50 of random weights under
# torchvision's file name lets the seed's commands run exactly as written (speed and memory do not depend on the
# values). A file already there (the real weights, in a user's TORCH_HOME) is never replaced.
export TORCH_HOME=${TORCH_HOME:-/tmp/torch_home}
mkdir -p "$TORCH_HOME/hub/checkpoints"
imagenet="$TORCH_HOME/hub/checkpoints/resnet50-0676ba61.pth"
if [ ! -f "$imagenet" ]; then
  $py -c "import torch, torchvision, sys; torch.save(torchvision.models.resnet50().state_dict(), sys.argv[1])" \
      "$imagenet.part" && mv "$imagenet.part" "$imagenet"
fi
