"""Launch shapes beyond one node of two ranks, on one CPU machine: a two-node torchrun rendezvous (c10d on
127.0.0.1, one process per "node"), the DeepSpeed launcher with a hostfile of two "nodes" (localhost and 127.0.0.1,
started over pdsh/ssh; skipped without them) and four ranks under ZeRO-3. Each runs the tiny recipe to its end: the
final weights agree on every rank and the run logged every step it should."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

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


def _ssh_to_itself() -> bool:
    if not shutil.which("pdsh"):
        return False
    return all(subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=3", host, "true"],
                              capture_output=True, timeout=15).returncode == 0 for host in ("localhost", "127.0.0.1"))


def test_deepspeed_hostfile_two_nodes_over_pdsh(shards, tmp_path):
    """`deepspeed --hostfile` naming this machine twice (localhost, 127.0.0.1; 1 slot each): the runner starts one
    node launcher per host over pdsh/ssh, as on a cluster. Needs pdsh and ssh to itself (tests/helpers/local_ssh.sh)."""
    if not _ssh_to_itself():
        pytest.skip("needs pdsh and passwordless ssh to localhost and 127.0.0.1: tests/helpers/local_ssh.sh")
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    runner = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    cmd = [runner, "--hostfile", str(hostfile), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "--num_nodes", "2", "--num_gpus", "1", str(ROOT / "pretrain.py"),
           *_args(shards, tmp_path, "hostfile", 4, "data.num_workers=1")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "cmd = pdsh" in out, out[-4000:]
    assert "identical on all 2 ranks" in out, out[-4000:]
    check_run(tmp_path / "hostfile", ("train/loss",), points=2)


def test_four_ranks_under_zero3(shards, tmp_path):
    """4 ranks x 1 data worker over 8 shards, parameters partitioned 4 ways (ZeRO-3); the health monitor's probe
    forwards gather the partitioned encoder on every rank and its features are gathered over the 4 ranks; its kNN
    probe extracts in lockstep (a rank out of clips keeps joining the collective forwards)."""
    launch(_args(shards, tmp_path, "four", 4, "engine.zero_stage=3", "data.num_workers=1", "monitor.every=2",
                 "monitor.clips=8", f"monitor.val={shards}"), ranks=4, timeout=400)
    check_run(tmp_path / "four", ("train/loss", "monitor/rankme", "monitor/feat_std_mean"), points=2)
    check_run(tmp_path / "four", ("monitor/knn_top1",), points=3)  # before the first step, then at steps 2 and 4
    assert len(list((tmp_path / "four" / "monitor").glob("probe_rank*.pt"))) == 4
