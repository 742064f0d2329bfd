#!/usr/bin/env bash
# Install, convert CIFAR-10 to .beton files, and train the first report's model.
#   SOURCE=path/to/cifar10.tar.gz bash quickstart.sh     to convert a local copy instead of downloading
set -euo pipefail
cd "$(dirname "$0")"
bash install.sh
fastcifar convert ${SOURCE:+--source "$SOURCE"}
fastcifar inspect
fastcifar train --model resnet_2111 ${TRAIN_ARGS:-}
