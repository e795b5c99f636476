"""The sbatch scripts on a real one-node SLURM (tests/slurm/local_cluster.sh: slurmctld + slurmd + munge on this
machine). SLURM's early-warning signal (what `#SBATCH --signal=B:USR1@300` sends 5 minutes before the time limit,
here sent at once with `scancel --batch --signal=USR1`) reaches the batch script; every rank checkpoints, the job is
requeued, and the requeued job ends with bitwise the weights of a run that was never stopped.

Needs `apt-get install -y slurm-wlm munge` and VSSL_TEST_SLURM=1 (about 6 minutes: SLURM holds a requeued job for
2 minutes before it may start again). Not part of CI, which has no SLURM.
"""
import os
import re
import shutil
import subprocess
import time

import pytest
import torch

from conftest import ROOT, TINY, free_port, launch, overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200),
              pytest.mark.skipif(os.environ.get("VSSL_TEST_SLURM") != "1" or not shutil.which("slurmctld"),
                                 reason="a real SLURM: apt-get install -y slurm-wlm munge, then VSSL_TEST_SLURM=1")]
STEPS = 40


def _sets(shards, out, name):
    return [*TINY, f"run.max_steps={STEPS}", "run.log_every=1", f"data.train={shards}", f"run.out_dir={out}",
            f"run.name={name}"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    script = ROOT / "tests" / "slurm" / "local_cluster.sh"
    out = subprocess.run(["bash", str(script), "start", str(root)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    env = {**os.environ, "SLURM_CONF": out.stdout.strip().split("=", 1)[1]}
    yield env
    subprocess.run(["bash", str(script), "stop", str(root)], timeout=60)


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    launch(["--config", "tiny_mae", *overrides(*_sets(shards, out, "straight"))])
    return torch.load(out / "straight" / "final_model.pt")


def _job(env, job: str) -> dict:
    text = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", text))


@pytest.mark.parametrize("script", ["slurm_deepspeed.sbatch", "slurm_srun.sbatch"])
def test_a_preempted_job_checkpoints_requeues_and_ends_as_if_never_stopped(cluster, shards, straight, tmp_path,
                                                                           script):
    env = {**cluster, "GPUS_PER_NODE": "2", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    log = tmp_path / "job.out"
    cmd = ["sbatch", "--parsable", "--gpus-per-node=0", f"--cpus-per-task={os.cpu_count()}", f"--output={log}",
           str(ROOT / "launchers" / script), "--config", "tiny_mae", *overrides(*_sets(shards, tmp_path, "cut"))]
    job = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.strip()
    deadline = time.monotonic() + 180
    while not (log.is_file() and "step 3/" in log.read_text()):
        assert time.monotonic() < deadline, log.read_text() if log.is_file() else "no output"
        time.sleep(0.5)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True)
    deadline = time.monotonic() + 600
    while (state := _job(env, job)).get("JobState") != "COMPLETED":
        assert state.get("JobState") not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), (state, log.read_text())
        assert time.monotonic() < deadline, (state, log.read_text()[-4000:])
        time.sleep(2)
    text = log.read_text()
    assert state["Restarts"] == "1" and state["ExitCode"] == "0:0", (state, text[-4000:])
    assert "requeueing job" in text and "(restart 1)" in text and "checkpointing at step" in text, text[-4000:]
    got = torch.load(tmp_path / "cut" / "final_model.pt")
    for k in straight:
        torch.testing.assert_close(got[k], straight[k], rtol=0, atol=0, msg=k)
