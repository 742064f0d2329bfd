#!/usr/bin/env bash
# Installs everything fastcifar needs on a fresh Debian/Ubuntu machine: the system libraries
# FFCV builds against, PyTorch (kept if one is already installed), then fastcifar itself.
set -euo pipefail
cd "$(dirname "$0")"

SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if ! pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq libturbojpeg0-dev libopencv-dev pkg-config >/dev/null
fi

PY=${PYTHON:-python3}
# Keep an installed torch (e.g. a CUDA build); otherwise install the pinned release first so
# that the range in setup.py is already satisfied and pip pulls nothing larger.
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
$PY -m pip install -q -e ".[test]"
