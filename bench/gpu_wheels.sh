#!/usr/bin/env bash
# The wheels gpu_suite.sh installs on the GPU machine, whose image lacks them (Python 3.12, manylinux x86_64),
# downloaded into .whl/ (ignored by git) at constraints.txt's versions:
#   bash bench/gpu_wheels.sh      then give ".whl" in the device call's carry
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
for name in pycocotools faster-coco-eval msgspec; do
  pin=$(grep -i "^$name==" constraints.txt) \
    || { echo "error: constraints.txt pins no $name; add a line $name==VERSION" >&2; exit 2; }
  $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${platforms[@]}" -d .whl "$pin"
done
ls .whl
