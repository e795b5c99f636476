#!/usr/bin/env bash
# One node, N processes with torchrun (the DeepSpeed engine inside is the same).
#   bash launchers/torchrun.sh 8 --config videomae_vit_b --set data.train=/data/k400/manifest.json
# Multi-node with torchrun: set NNODES, NODE_RANK, MASTER_ADDR (and MASTER_PORT) on every node.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC="${1:?usage: torchrun.sh NPROC [pretrain.py args...]}"; shift
exec .venv/bin/torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    --nproc_per_node "$NPROC" pretrain.py "$@"
