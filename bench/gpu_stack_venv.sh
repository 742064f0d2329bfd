#!/usr/bin/env bash
# The GPU node's Python stack on a CPU machine, to run the tests and the suite's stages against
# the versions the GPU node has before spending GPU time on them.
#
#   bash bench/gpu_stack_venv.sh [VENV]          (default VENV: .venv-gpu-stack; .gitignore keeps /.venv*/ out)
#   source VENV/bin/activate && source .gpu/env.sh && export PYTHONPATH=$PWD:$PYTHONPATH
#   python -m pytest -q tests                    # or: OUT=/tmp/out bash bench/gpu_suite.sh preflight
#
# The GPU node (bench/README.md): Python 3.12, torch 2.11.0 (CUDA 13.0 build), Triton 3.6.0,
# torchvision 0.26.0, numba, numpy 2.5, opencv-python-headless, matplotlib, typer, tqdm, pytest,
# scipy, tensorboard; ffcv and airbench come from the offline bundle `.gpu/`
# (`bash ../shared/tools/gpu-bundle.sh .gpu`). One difference is deliberate: NumPy is held below
# 2.4 here, because Triton 3.6's interpreter (the CPU stand-in for a GPU) cannot run the kernels
# with a newer one (kernels/batchnorm.py: interpreter_problem); compiled kernels on the GPU node
# are not affected. The CUDA build of torch installs and imports without a GPU (~3 GB download).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-gpu-stack}
py312=${PYTHON312:-}
for c in python3.12 /root/.pyenv/versions/3.12*/bin/python3; do
  [ -z "$py312" ] && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && py312=$c
done
[ -n "$py312" ] || { echo "error: no Python 3.12 found (set PYTHON312=/path/to/python3.12)" >&2; exit 1; }
"$py312" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q torch==2.11.0 triton==3.6.0 torchvision==0.26.0 "numpy<2.4" numba \
  opencv-python-headless matplotlib typer tqdm pytest scipy tensorboard pillow
"$venv/bin/python" -c "import torch, triton, numpy; print('torch', torch.__version__, '| triton', triton.__version__, '| numpy', numpy.__version__)"
[ -f .gpu/env.sh ] || echo "note: no .gpu/ bundle yet (ffcv, airbench, data): bash ../shared/tools/gpu-bundle.sh .gpu"
