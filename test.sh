#!/usr/bin/env bash
# Install everything, then run the test suite on the CPU (Triton kernels run in its interpreter).
set -euo pipefail
cd "$(dirname "$0")"
bash install.sh
python3 -m pytest -q tests "$@"
