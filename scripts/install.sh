#!/usr/bin/env bash
# Install everything dino_bridge needs, from scratch: the Fashion-MNIST demo data (Debian package
# dataset-fashion-mnist), a virtual environment in .venv, and the package with its dev, data and report extras.
# Safe to re-run. Set PYTHON to choose the interpreter (3.10 or newer).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

FMNIST=/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ] && [ -z "${DINO_BRIDGE_FASHION_MNIST:-}" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    echo "installing the Fashion-MNIST demo data (apt: dataset-fashion-mnist)"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "warning: no apt-get here; get Fashion-MNIST's idx .gz files and set DINO_BRIDGE_FASHION_MNIST" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# the optional data sources' extras too, so their tests run (and bench_data's photos for its test),
# and matplotlib for dino-bridge report
.venv/bin/python -m pip install -q -e ".[dev,h5,wsi,shards,bench,report]"
.venv/bin/python -c "import dino_bridge, torch; print('dino_bridge installed; torch', torch.__version__)"
