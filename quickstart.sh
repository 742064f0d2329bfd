#!/usr/bin/env bash
# Install, convert CIFAR-10 to .beton files, and train the first report's model.
#   SOURCE=path/to/cifar10.tar.gz bash quickstart.sh     to convert a local copy instead of downloading
#   TRAIN_ARGS="--epochs 30" bash quickstart.sh           extra options for `fastcifar train`
set -euo pipefail
cd "$(dirname "$0")"
bash install.sh
fastcifar convert ${SOURCE:+--source "$SOURCE"}
fastcifar inspect
if python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  fastcifar train --model resnet_2111 ${TRAIN_ARGS:-}
else
  # resnet_2111's recipe would take hours on a CPU: a narrow speedrun_net for two epochs
  # shows the whole path (data, model, loop, evaluation, run folder) in a minute or two
  # (about 77% test accuracy in 90 s on 2 idle CPU cores).
  echo "No GPU found: training a short demonstration on the CPU instead of resnet_2111"
  echo "(speedrun_net at a quarter of its width, 2 epochs); on a GPU this script trains resnet_2111."
  fastcifar train --model speedrun_net --model-opt 'widths=[16,32,64,64]' --epochs 2 --batch-size 256 ${TRAIN_ARGS:-}
fi
