"""The shared contrastive primitives: all_gather with gradient (2 ranks x b == 1 rank x 2b) and EMA targets
under ZeRO-3 (equal to an EMA computed by hand)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import ROOT, free_port
from vssl_ds.engine.dist import all_gather_grad


def _nt_xent(z: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """SimCLR loss over 2N embeddings (pairs i, i+N)."""
    z = torch.nn.functional.normalize(z, dim=-1)
    n = z.shape[0] // 2
    sim = z @ z.t() / tau
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return torch.nn.functional.cross_entropy(sim, target)


def _loss(model, a, b):
    """NT-Xent over the embeddings of both views, gathered from every rank (views kept in rank order)."""
    za, zb = all_gather_grad(model(a)), all_gather_grad(model(b))
    return _nt_xent(torch.cat([za, zb]))


def _worker(rank, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)  # the global batch of 2 x 4
    _loss(model, a[rank * 4:(rank + 1) * 4], b[rank * 4:(rank + 1) * 4]).backward()
    grad = model.weight.grad.clone()
    dist.all_reduce(grad)
    grad /= 2  # the engine averages gradients over ranks
    if rank == 0:
        torch.save(grad, out)
    dist.destroy_process_group()


def test_gathered_gradient_equals_the_single_rank_gradient(tmp_path):
    out = tmp_path / "grad.pt"
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=2, join=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    _loss(model, a, b).backward()  # one process, the whole batch
    assert torch.allclose(torch.load(out), model.weight.grad, atol=1e-6)


def test_without_a_process_group_gather_is_the_identity():
    x = torch.randn(3, 2, requires_grad=True)
    assert all_gather_grad(x) is x


def test_momentum_schedule_rises_to_one():
    from vssl_ds.methods.ema import momentum_schedule

    m = momentum_schedule(0.99, 100)
    assert m[0] == pytest.approx(0.99) and m[-1] > 0.9999 and all(x <= y for x, y in zip(m, m[1:]))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_ema_target_equals_a_hand_computed_ema(stage):
    runner = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    cmd = [runner, "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "tests" / "helpers" / "ema_probe.py"),
           str(stage)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("ema error") == 2
