"""Shared fixtures: shards written inside the tests, and a runner for real multi-rank DeepSpeed jobs."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")


# the tiny MAE every multi-process test runs: 8 frames of 32², 2x8x8 tubelets → 64 tokens
TINY = [
    "model.name=vit_micro_video", "model.img_size=32", "model.num_frames=8", "model.patch=8",
    "data.num_frames=8", "data.sampling_rate=2", "data.size=32", "data.batch_size=2", "data.num_workers=2",
    "method.mae.decoder_dim=32", "method.mae.decoder_depth=1", "method.mae.decoder_heads=2",
    "method.mae.norm_pix_loss=true",  # VideoMAE's targets (the embedded default regresses plain pixels)
    "optim.lr=2e-3", "optim.warmup_steps=2", "run.log_every=2", "run.ckpt_every=0",
]


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """8 shards x 4 generated clips (real H.264 mp4 in WebDataset tars) and their manifest."""
    from vssl_ds.data.synthetic import write_synthetic_shards

    return write_synthetic_shards(tmp_path_factory.mktemp("shards"), clips=32, shards=8, frames=24, size=48)


def crash_on_first_video(manifest: Path, module, monkeypatch) -> tuple[str, str]:
    """Patch `module.decode` so that decoding the first video of the manifest's first shard kills the process doing
    it (SIGKILL, as the out-of-memory killer sends; data workers fork after the patch and run it).
    → (that video's key, its shard)"""
    import json
    import signal
    import tarfile

    first = json.loads(manifest.read_text())["shards"][0]["url"]
    first = first if os.path.isabs(first) else str(manifest.parent / first)
    with tarfile.open(first) as tar:
        victim = next(m for m in tar.getmembers() if m.name.endswith(".mp4"))
        victim_key, victim_bytes = victim.name[:-4], tar.extractfile(victim).read()
    real = module.decode

    def crashing(data, pick, order):
        if data == victim_bytes:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(data, pick, order)

    monkeypatch.setattr(module, "decode", crashing)
    return victim_key, first


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], ranks: int = 2, timeout: int = 300, check: bool = True, script: str = "pretrain.py",
           **popen) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N pretrain.py ARGS` (or another script of the repo) on CPU (gloo), as a user runs it."""
    runner = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    cmd = [runner, "--num_gpus", str(ranks), "--master_port", str(free_port()), str(ROOT / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **popen)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


def overrides(*items: str) -> list[str]:
    out = []
    for item in items:
        out += ["--set", item]
    return out


@pytest.fixture(scope="session")
def image_shards(tmp_path_factory) -> Path:
    """20 generated JPEG images (first frames of generated clips) in 2 shards, written by make_shards."""
    from PIL import Image

    from vssl_ds.data.synthetic import SHAPES, render_clip
    from vssl_ds.tools.make_shards import main as make_shards

    import numpy as np

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    for i in range(20):
        folder = root / "src" / SHAPES[i % 4]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(render_clip(rng, i % 4, 1, 48)[0]).save(folder / f"img{i:03d}.png")
    assert make_shards([str(root / "src"), str(root / "shards"), "--kind", "image", "--prefix", "img",
                        "--max-per-shard", "10", "--workers", "1"]) == 0
    return root / "shards" / "manifest.json"


def overfit(method, batch, steps: int, lr: float) -> tuple[float, float]:
    """AdamW on one fixed batch for `steps` steps → (first loss, last loss)."""
    import torch

    opt = torch.optim.AdamW(method.param_groups(0.0), lr=lr)
    first = float(method(batch).loss.detach())
    for _ in range(steps):
        out = method(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return first, float(out.loss.detach())


def check_run(run_dir: Path, tags: tuple[str, ...], points: int) -> None:
    """A finished multi-rank run: identical final weights on every rank, `points` logged values per tag."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    digests = json.loads((run_dir / "final_digests.json").read_text())
    assert len(set(digests["ranks"])) == 1, digests
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    for tag in tags:
        assert len(acc.Scalars(tag)) == points, tag
