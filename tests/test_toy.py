"""Every method, export and evaluation mode at toy size through the public CLI, as the README's "Every method at
toy size" section runs them: tools/make_toy.py writes data/toy/, then each toy_* recipe trains a few steps in
its own process (two at a time: CI has two cores). Each run must end cleanly with finite logged losses."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import ROOT

PY = sys.executable
STEPS = ["--set", "run.max_steps=3", "--set", "run.log_every=1", "--set", "run.ckpt_every=0"]
PRETRAIN = ["toy_mae", "toy_mvd", "toy_bevt", "toy_vicmae", "toy_iboot", *(
    f"toy_lstcl_{fw}_{bb}" for fw in ("mocov3", "byol", "simsiam") for bb in ("vit", "swin"))]

pytestmark = pytest.mark.slow


def run(cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([PY, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"{' '.join(proc.args)} → {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"


def losses(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {tag: [s.value for s in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
            if tag == "train/loss" or tag.startswith("loss/")}


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """A working folder with data/toy/ (tools/make_toy.py), every pretraining recipe run for 3 steps, the MVD
    and iBoot teacher caches and the runs that read them."""
    cwd = tmp_path_factory.mktemp("toy")
    ok(run(cwd, str(ROOT / "tools/make_toy.py")))
    jobs = [[str(ROOT / "pretrain.py"), "--config", r, *STEPS] for r in PRETRAIN]
    for method, views in (("mvd", "2"), ("iboot", "1")):
        jobs.append([str(ROOT / "tools/cache_teachers.py"), f"data/toy/{method}_cache", "--config", f"toy_{method}",
                     "--views", views])
    with ThreadPoolExecutor(2) as pool:
        for proc in pool.map(lambda a: run(cwd, *a), jobs):
            ok(proc)
    cached = [[str(ROOT / "pretrain.py"), "--config", f"toy_{m}", *STEPS, "--set", f"method.{m}.targets=cache",
               "--set", f"data.targets=data/toy/{m}_cache", "--set", f"run.name=toy_{m}_cached"] for m in ("mvd", "iboot")]
    with ThreadPoolExecutor(2) as pool:
        for proc in pool.map(lambda a: run(cwd, *a), cached):
            ok(proc)
    return cwd


@pytest.mark.parametrize("name", [*PRETRAIN, "toy_mvd_cached", "toy_iboot_cached"])
def test_every_method_trains_at_toy_size(toy, name):
    logged = losses(toy / "runs" / name)
    assert len(logged["train/loss"]) == 3 and len(logged) > 1, logged  # the total and at least one term
    assert all(math.isfinite(v) for values in logged.values() for v in values), logged
    assert (toy / "runs" / name / "final_model.pt").is_file()


def test_export_and_every_evaluation_mode(toy):
    ok(run(toy, str(ROOT / "tools/export.py"), "runs/toy_mae"))
    assert (toy / "runs/toy_mae/export/encoder.safetensors").is_file()
    evals = [("finetune", "toy_finetune", []), ("linear", "toy_linear", []), ("attentive", "toy_attentive", []),
             ("knn", "toy_knn", []),
             ("linear", "toy_linear", ["--set", "eval.weights=", "--set", "run.name=toy_linear_random"])]
    jobs = [[str(ROOT / "tools/evaluate.py"), mode, "--config", recipe, "--set", "run.max_steps=3", *extra]
            for mode, recipe, extra in evals]
    with ThreadPoolExecutor(2) as pool:
        for proc in pool.map(lambda a: run(toy, *a), jobs):
            ok(proc)
    import json

    for name in ("toy_finetune", "toy_linear", "toy_attentive", "toy_knn", "toy_linear_random"):
        result = json.loads((toy / "runs" / name / "results.json").read_text())
        assert 0.0 <= result["top1"] <= 100.0 and math.isfinite(result["top1"]), (name, result)
