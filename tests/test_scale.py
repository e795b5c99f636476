"""Launch shapes beyond one node of two ranks, on one CPU machine: a two-node torchrun rendezvous (c10d on
127.0.0.1, one process per "node") and four ranks under ZeRO-3. Each runs the tiny recipe to its end: the final
weights agree on every rank and the run logged every step it should."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, check_run, free_port, launch, overrides

pytestmark = pytest.mark.slow


def _args(shards, tmp_path, name: str, steps: int = 4, *extra: str) -> list[str]:
    return ["--config", "tiny_mae", *overrides(*TINY, f"data.train={shards}", f"run.out_dir={tmp_path}",
                                               f"run.name={name}", f"run.max_steps={steps}", *extra)]


def test_two_node_torchrun_rendezvous_on_localhost(shards, tmp_path):
    """Two `torchrun --nnodes 2 --nproc_per_node 1` processes meet through c10d on 127.0.0.1, as two nodes would
    (each its own node rank and LOCAL_RANK 0), and train the tiny recipe to the end together."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "vssl-two-nodes",
           str(ROOT / "pretrain.py"), *_args(shards, tmp_path, "two_nodes", 4, "data.num_workers=1")]
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [n.communicate(timeout=300)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), "\n-----\n".join(o[-3000:] for o in outs)
    check_run(tmp_path / "two_nodes", ("train/loss",), points=2)


def test_four_ranks_under_zero3(shards, tmp_path):
    """4 ranks x 1 data worker over 8 shards, parameters partitioned 4 ways (ZeRO-3)."""
    launch(_args(shards, tmp_path, "four", 4, "engine.zero_stage=3", "data.num_workers=1"), ranks=4, timeout=400)
    check_run(tmp_path / "four", ("train/loss",), points=2)
