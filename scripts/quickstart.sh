#!/usr/bin/env bash
# One command from a fresh clone: install everything (demo data included), then pretrain a small
# ViT on Fashion-MNIST on the CPU and print its kNN accuracy before and after (runs/quickstart).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/dino-bridge quickstart "$@"
