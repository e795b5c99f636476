#!/usr/bin/env bash
# Create .venv and install vssl_ds with its test extras. Safe to re-run.
#   TORCH_SPEC   torch requirement (default torch==2.13.0: the CPU wheel on machines without a GPU;
#                on a CUDA cluster set e.g. TORCH_SPEC="torch==2.13.0" with your CUDA index configured)
#   EXTRAS       pip extras to install (default: test)
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TV_SPEC="${TV_SPEC:-torchvision==0.28.0}"   # the torchvision release that matches torch 2.13.0
EXTRAS="${EXTRAS:-test}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade uv
# uv ignores pip's settings: hand it the local wheel folder (where the CPU torch wheel lies) explicitly
FIND_LINKS=()
[ -n "${PIP_FIND_LINKS:-}" ] && FIND_LINKS=(--find-links "$PIP_FIND_LINKS")
# torch is pinned in the same resolve as everything else, so no dependency can pull another build.
# --compile-bytecode: uv writes no .pyc by default, and where PYTHONDONTWRITEBYTECODE is set (CI images, containers)
# every process would then compile torch, deepspeed and sympy from source again: ~7 s of each start on 2 cores
.venv/bin/python -m uv pip install --compile-bytecode --python .venv/bin/python "${FIND_LINKS[@]}" \
    "$TORCH_SPEC" "$TV_SPEC" -e ".[${EXTRAS}]"
.venv/bin/python -c "import vssl_ds.models, deepspeed, decord, webdataset; print('vssl_ds installed in .venv')" 2>&1 \
    | grep -v "Setting accelerator to CPU"
