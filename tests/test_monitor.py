"""The health monitor (vssl_ds/monitor.py): its statistics against values worked out by hand, the collapse alarm,
and a run with the monitor ending bitwise where the same run without it ends (it never touches the training RNG or
data stream)."""
import logging
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from conftest import ROOT, TINY, overrides
from vssl_ds.config.loader import load_config
from vssl_ds.monitor import HealthMonitor, health


def test_statistics_against_hand_computed_values():
    # two orthogonal directions with singular values 3 and 1: p = (3/4, 1/4), RankMe = exp(H(p))
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    f = u @ torch.diag(torch.tensor([3.0, 1.0]))
    assert health(f)["rankme"] == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), rel=1e-6)
    # every clip the same point: collapse — no spread, rank 1, cosine 1
    same = health(torch.ones(16, 8) * torch.arange(1.0, 9.0))
    assert same["feat_std_mean"] == pytest.approx(0.0, abs=1e-9) and same["rankme"] == pytest.approx(1.0, abs=1e-6)
    assert same["cos_mean"] == pytest.approx(1.0)
    # isotropic Gaussian features: std of unit vectors x sqrt(D) ≈ 1, near-full rank, cosine ≈ 0
    g = health(torch.randn(4096, 16, generator=torch.Generator().manual_seed(0)))
    assert 0.95 < g["feat_std_mean"] < 1.05 and g["rankme"] > 15.5 and abs(g["cos_mean"]) < 0.01
    # a pair of clips at a known angle
    assert health(torch.tensor([[1.0, 0.0], [0.6, 0.8]]))["cos_mean"] == pytest.approx(0.6)


class _Collapsing(nn.Module):  # an encoder whose clips spread out until `collapsed`, then all map to one point
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3 * 2 * 8 * 8, 4 * 8)
        self.collapsed = False

    def forward(self, video, mask=None):
        x = self.proj(video.flatten(1)).view(video.shape[0], 4, 8)
        return torch.ones_like(x) if self.collapsed else x


class _Recorder:
    def __init__(self):
        self.scalars, self.texts = {}, []

    def add(self, scalars, step):
        self.scalars.update(scalars)

    def text(self, tag, text, step):
        self.texts.append((tag, text))


def test_a_collapse_after_learning_raises_the_alarm_once(tmp_path, caplog):
    cfg = load_config("tiny_mae", ["monitor.every=1", "monitor.clips=6"])
    rec, encoder = _Recorder(), _Collapsing()
    mon = HealthMonitor(cfg, encoder, torch.device("cpu"), tmp_path, rec)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        mon.collect(torch.randint(0, 255, (4, 3, 2, 8, 8), dtype=torch.uint8, generator=g))
    assert len(mon.probe) == 6 and (tmp_path / "monitor" / "probe_rank0.pt").is_file()  # kept for a resume
    with caplog.at_level(logging.WARNING):
        mon.run(1)  # spread out: no alarm, the best so far
        assert rec.scalars["monitor/rankme"] > 2 and not rec.texts
        encoder.collapsed = True
        mon.run(2)
        mon.run(3)
    alarms = [r for r in caplog.records if "possible representation collapse" in r.getMessage()]
    assert len(alarms) == 1 and "learning rate" in alarms[0].getMessage()  # once, with what to check
    assert rec.texts and rec.texts[0][0] == "monitor/alarm" and rec.scalars["monitor/feat_std_mean"] < 1e-6


@pytest.mark.slow
def test_the_monitor_leaves_the_run_bitwise_unchanged(shards, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    runs = {}
    for name, every in (("with", 2), ("without", 0)):
        sets = [*TINY, "run.max_steps=8", f"data.train={shards}", f"run.out_dir={tmp_path}", f"run.name={name}",
                f"monitor.every={every}", "monitor.clips=8", "model.drop_path=0.1",  # drop path: the RNG is in use
                *([f"monitor.val={shards}"] if every else [])]  # the kNN probe reads other data mid-run
        proc = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), "--config", "tiny_mae", *overrides(*sets)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = torch.load(tmp_path / name / "final_model.pt")
        if every:
            assert "monitor kNN top-1" in proc.stdout + proc.stderr
            assert "health monitor:" in proc.stdout + proc.stderr and (tmp_path / name / "monitor" / "probe_rank0.pt").is_file()
    for k in runs["without"]:
        torch.testing.assert_close(runs["with"][k], runs["without"][k], rtol=0, atol=0, msg=k)


@pytest.mark.slow
def test_on_a_terminal_rank_0_shows_a_progress_bar(shards, tmp_path):
    """On a (pseudo-)terminal of 160 columns the run draws a tqdm bar (steps of the total, rate, ETA, last loss)
    with the log lines above it; off a terminal (every other test) there is no bar."""
    import fcntl
    import pty
    import struct
    import termios

    sets = [*TINY, "run.max_steps=6", "run.log_every=3", f"data.train={shards}", f"run.out_dir={tmp_path}",
            "run.name=tty", "data.num_workers=1"]
    cmd = [sys.executable, str(ROOT / "pretrain.py"), "--config", "tiny_mae", *overrides(*sets)]
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    out = bytearray()
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the terminal closed: the run has ended
            break
        if not data:
            break
        out.extend(data)
    os.close(master)
    assert proc.wait(timeout=120) == 0, out.decode(errors="replace")[-3000:]
    text = out.decode(errors="replace")
    assert "tty: 100%" in text and "6/6 [" in text and "step/s" in text and "loss 1." in text, text[-3000:]
    assert "step 6/6 epoch" in text  # the log lines still come


def test_mae_reconstruction_of_a_perfect_prediction_is_the_clip(tmp_path):
    """With predictions equal to the normalised-pixel targets of the hidden tubelets, the de-normalised, pasted
    reconstruction is the original clip; the masked input is grey exactly where the mask hides; the TensorBoard
    grid stacks original / masked / reconstruction per clip."""
    import numpy as np

    from vssl_ds.methods import build_method, mask_fns
    from vssl_ds.methods.losses import pixel_targets
    from vssl_ds.monitor import contact_sheet

    cfg = load_config("tiny_mae", [*TINY, "monitor.images=2"])
    method = build_method(cfg)
    fn = mask_fns(cfg)[0]
    mask = torch.from_numpy(np.stack([fn(np.random.default_rng(i)) for i in range(2)]))
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 8, 32, 32, generator=g)
    video = (pixels - method.mean) / method.std

    class Oracle(nn.Module):
        def forward(self, v, m):
            return pixel_targets(v * method.std + method.mean, method.patch_size, True)[m].reshape(2, -1, 2 * 8 * 8 * 3)

    method.trainable = Oracle()
    out = method.reconstruct(video, mask)
    torch.testing.assert_close(out["reconstruction"], pixels, atol=1e-4, rtol=0)
    torch.testing.assert_close(out["original"], pixels, atol=1e-6, rtol=0)
    grey = (out["masked"] == 0.5).all(dim=1)  # [B,T,H,W]: hidden pixels
    assert grey.float().mean().item() == pytest.approx(mask.float().mean().item(), abs=0.01)
    sheet = contact_sheet(out, frames=4, gap=2)
    assert sheet.shape == (3, 2 * 3 * (32 + 2), 4 * (32 + 2))


def test_alignment_and_uniformity_against_hand_computed_values():
    from vssl_ds.monitor import alignment_uniformity

    e = torch.eye(4)
    # views that agree: alignment 0; four orthogonal unit vectors are all sqrt(2) apart: uniformity = -2 * 2
    same = alignment_uniformity(3 * e, e)
    assert same["alignment"] == pytest.approx(0.0, abs=1e-12) and same["uniformity"] == pytest.approx(-4.0)
    # antipodal views: |u - v|^2 = 4; everything on one point: uniformity 0 (collapse)
    apart = alignment_uniformity(torch.ones(3, 2), -torch.ones(3, 2))
    assert apart["alignment"] == pytest.approx(4.0) and apart["uniformity"] == pytest.approx(0.0, abs=1e-12)


def test_two_clip_methods_report_alignment_and_uniformity(tmp_path):
    """For a method with a `probe_pair` the monitor keeps the other clip of each probe video and reports
    alignment / uniformity of the two clips' features; a resumed monitor reads both from its probe file."""
    cfg = load_config("tiny_mae", ["monitor.every=1", "monitor.clips=6"])
    method = type("TwoClip", (), {"probe_pair": "long"})()
    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 255, (6, 3, 2, 8, 8), dtype=torch.uint8, generator=g)
    rec = _Recorder()
    mon = HealthMonitor(cfg, _Collapsing(), torch.device("cpu"), tmp_path, rec, method)
    mon.collect(video[:4], {"long": video[:4]})
    mon.collect(video[4:], {"long": video[4:]})
    mon.run(1)
    assert rec.scalars["monitor/alignment"] == pytest.approx(0.0, abs=1e-9)  # the same clip twice
    assert -4.5 < rec.scalars["monitor/uniformity"] < 0
    again = HealthMonitor(cfg, _Collapsing(), torch.device("cpu"), tmp_path, _Recorder(), method)
    assert torch.equal(again.probe, video) and torch.equal(again.probe_pair, video)
    mon.probe_pair = torch.flip(video, dims=[0])  # every clip paired with another video's clip
    mon.run(2)
    assert rec.scalars["monitor/alignment"] > 0.1
