#!/usr/bin/env bash
# One-time set-up of a fresh machine: Debian datasets/fonts (when apt is available) and a pinned virtualenv.
# Idempotent: re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

# Debian packages: the demo's dataset and the emoji font (data), and tini (the container image's PID 1, which
# tests/k8s/test_pod_faults.py runs as a pod would). Only the missing ones are installed.
missing=()
[ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
[ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || missing+=(fonts-noto-color-emoji)
command -v tini >/dev/null || missing+=(tini)
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Debian packages ${missing[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null 2>&1 \
      || echo "[setup] WARNING: apt-get failed: without dataset-fashion-mnist the demo falls back to scikit-learn digits; without tini the pod tests fail"
  else
    echo "[setup] WARNING: apt-get unavailable (or not root), missing ${missing[*]}: without dataset-fashion-mnist the demo falls back to scikit-learn digits; without tini the pod tests fail"
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PY"
  "$PY" -m venv .venv
fi
# Everything: the core and every extra (deepspeed, text, ssl, eval, s3, gcs) plus the test tools (dev).
if ! .venv/bin/python -c "import deepflow, deepspeed, open_clip, torchvision, pytorch_fid, torch_fidelity, s3fs, gcsfs" >/dev/null 2>&1 \
   || [ ! -x .venv/bin/deepflow ]; then
  echo "[setup] installing pinned dependencies (constraints.txt)"
  .venv/bin/pip install -q --upgrade pip
  # torch first, pinned: an unpinned resolve may pull a different multi-GB build.
  .venv/bin/pip install -q -c constraints.txt torch torchvision
  # DeepSpeed ships as an sdist whose build imports torch: build it against the torch just installed.
  .venv/bin/pip install -q -c constraints.txt --no-build-isolation deepspeed
  .venv/bin/pip install -q -c constraints.txt -e ".[all,dev]"
fi
echo "[setup] ready: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
