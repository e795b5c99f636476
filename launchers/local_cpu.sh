#!/usr/bin/env bash
# Two DeepSpeed ranks on this machine's CPU (gloo), e.g. to try a recipe before a cluster run.
#   bash launchers/local_cpu.sh [RANKS] [pretrain.py args...]
#   bash launchers/local_cpu.sh 2 --config tiny_mae --set engine.zero_stage=3
set -euo pipefail
cd "$(dirname "$0")/.."
RANKS="${1:-2}"; shift || true
[ $# -gt 0 ] || set -- --config tiny_mae
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # one thread per rank: ranks x threads <= cores
exec .venv/bin/deepspeed --num_gpus "$RANKS" pretrain.py "$@"
