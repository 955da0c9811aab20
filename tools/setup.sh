#!/usr/bin/env bash
# Make .venv with everything the project needs, at the versions it is tested with. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -r requirements.txt -r requirements-dev.txt -r requirements-export.txt -c constraints.txt
# LVIS's own evaluation (lvis-api), which tests/test_bench_lvis_parity.py scores against; without its other
# requirements, which serve its visualiser (OpenCV) and are not needed to score.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps lvis==0.5.3
