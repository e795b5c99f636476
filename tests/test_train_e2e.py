"""The whole path through pretrain.py with real DeepSpeed ranks on CPU (gloo), on shards written in the tests."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, free_port, launch, overrides

pytestmark = pytest.mark.slow


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def _args(shards, out, *extra):
    return ["--config", "tiny_mae", *overrides(*TINY, f"data.train={shards}", f"run.out_dir={out}", *extra)]


# ZeRO-1 (the default): every other 2-rank run, the README's included; ZeRO-2: the 2-rank SimSiam run (test_lstcl.py)
@pytest.mark.parametrize("stage", [3])
def test_two_ranks_each_zero_stage(shards, tmp_path, stage):
    launch(_args(shards, tmp_path, f"engine.zero_stage={stage}", "run.max_steps=12", "run.name=z"))
    run = tmp_path / "z"
    digests = json.loads((run / "final_digests.json").read_text())
    assert len(digests["ranks"]) == 2 and digests["ranks"][0] == digests["ranks"][1]  # identical parameters
    losses = _scalars(run, "train/loss")
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    for tag in ("loss/pixel", "opt/lr", "perf/clips_per_s", "perf/data_wait_frac", "perf/peak_mem_gib"):
        assert _scalars(run, tag), tag
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "latest").read_text() == "step00000012"


def test_resume_gives_the_same_parameters(shards, tmp_path):
    """8 steps straight == 4 steps, stop, resume (from a torchrun launch), 4 steps: bitwise on CPU."""
    common = ["engine.zero_stage=2", "run.max_steps=8"]
    launch(_args(shards, tmp_path, *common, "run.name=straight"))
    launch(_args(shards, tmp_path, *common, "run.name=split", "run.stop_at=4"))
    ckpts = tmp_path / "split" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step00000004"
    (ckpts / "step00000099").mkdir()  # a save that crashed half-way: `latest` never moved to it
    (ckpts / "step00000099" / "junk").write_text("partial")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    proc = subprocess.run(torchrun + [str(ROOT / "pretrain.py"), "--auto-resume",
                                      *_args(shards, tmp_path, *common, "run.name=split")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "resumed at step 4" in proc.stdout
    a = torch.load(tmp_path / "straight" / "final_model.pt")
    b = torch.load(tmp_path / "split" / "final_model.pt")
    assert a.keys() == b.keys()
    for k in a:  # stated tolerance: exact equality (same data order, same RNG, deterministic CPU kernels)
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def _single(shards, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "pretrain.py"), *_args(shards, out, *extra)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_checkpoints_and_exits_cleanly(shards, tmp_path):
    proc = _single(shards, tmp_path, "run.max_steps=100000", "run.log_every=1", "run.name=pre")
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "step 3/" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(seen) + proc.stdout.read()
    assert proc.wait(timeout=120) == 0, out[-4000:]
    assert "checkpointing at step" in out
    latest = (tmp_path / "pre" / "checkpoints" / "latest").read_text()
    assert int(latest.removeprefix("step")) >= 3


def test_nonfinite_losses_stop_the_run_with_advice(shards, tmp_path):
    proc = _single(shards, tmp_path, "optim.lr=1e30", "optim.warmup_steps=0", "run.max_nonfinite=3",
                   "run.max_steps=50", "run.name=nan")
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 3
    assert "non-finite losses in a row" in out and "optim.clip_grad" in out, out[-3000:]
    # the flags are read at the log lines (every 2 steps here): the run stops at the first that sees 3 in a row
    run = int(re.search(r"(\d+) non-finite losses in a row up to step", out).group(1))
    assert run >= 3 and "that optimizer step left the weights unchanged" in out
    assert _scalars(tmp_path / "nan", "train/nonfinite_total")[-1] >= run  # written before the abort


def test_a_nonfinite_loss_costs_its_step_and_nothing_else(tmp_path):
    """Engines at every ZeRO stage (fp32 and bf16), 2 ranks, accumulation windows of 2 micro-steps: a NaN loss on
    one rank, or a loss of +inf whose gradients stay finite, leaves every rank's master weights, AdamW moments and
    step counts bitwise unchanged through the window's optimizer step, without the loop reading anything back per
    micro-step; the next window trains again."""
    proc = launch(["0:fp32", "1:fp32", "2:bf16", "3:bf16"], script="tests/helpers/skip_probe.py", timeout=240)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("PROBE "))
    for setting, ranks in json.loads(line[6:]).items():
        assert len(ranks) == 2, setting
        for report in ranks:
            assert report["flags"] == [[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]], (setting, report)  # global flags
            assert report["spoilt_kept"] == [True] * 3, (setting, report)
            assert report["clean_moves"] == [True] * 3, (setting, report)
