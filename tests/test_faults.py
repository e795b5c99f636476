"""Stop paths a cluster user meets (docs/RELIABILITY.md): every signal path ends in one checkpoint whose resume gives
bitwise the uninterrupted run's final weights and the same per-step sample keys (0 lost, 0 repeated)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import ROOT, TINY, free_port, launch, overrides

STEPS = 14
COMMON = ["engine.zero_stage=1", f"run.max_steps={STEPS}", "run.log_every=1", "run.record_keys=true",
          "run.hang_timeout=90"]  # a hang fails the test within minutes, with every rank's stacks in its output


def _args(shards, out, name, *extra):
    return ["--config", "tiny_mae", *overrides(*TINY, *COMMON, f"data.train={shards}", f"run.out_dir={out}",
                                                 f"run.name={name}", *extra)]


def _keys(run_dir):
    return {p.name: [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted((run_dir / "keys").glob("rank*.jsonl"))}


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    launch(_args(shards, out, "straight"))
    return torch.load(out / "straight" / "final_model.pt"), _keys(out / "straight")


def _launcher(kind: str, args: list[str]) -> list[str]:
    if kind == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), str(ROOT / "pretrain.py"), *args]
    runner = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    return [runner, "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "pretrain.py"), *args]


def _targets(proc: subprocess.Popen, path: str) -> list[int]:
    """The pids the signal goes to on this path."""
    tree = psutil.Process(proc.pid).children(recursive=True)
    if path == "node_launcher_term":
        return [p.pid for p in tree if "deepspeed.launcher.launch" in " ".join(p.cmdline())]
    if path == "torchrun_term":
        return [proc.pid]
    scripts = [p for p in tree if "pretrain.py" in " ".join(p.cmdline())
               and "deepspeed.launcher.launch" not in " ".join(p.cmdline())]
    ranks = [p for p in scripts if p.ppid() not in {q.pid for q in scripts}]  # not their forked data workers
    assert len(ranks) == 2, [p.cmdline() for p in tree]
    return [p.pid for p in ranks if p.environ().get("LOCAL_RANK") == "1"]


@pytest.mark.slow
@pytest.mark.parametrize("path", ["rank1_usr1", "group_sigint", "node_launcher_term", "torchrun_term"])
def test_every_stop_path_resumes_bitwise_with_the_same_keys(shards, tmp_path, straight, path):
    want_weights, want_keys = straight
    kind = "torchrun" if path.startswith("torchrun") else "deepspeed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(_launcher(kind, _args(shards, tmp_path, "cut")), cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "step 3/" in line:
            if path == "group_sigint":  # Ctrl-C in the terminal: the whole foreground process group
                os.killpg(proc.pid, signal.SIGINT)
            else:
                sig = signal.SIGUSR1 if path.endswith("usr1") else signal.SIGTERM
                for pid in _targets(proc, path):
                    os.kill(pid, sig)
            break
    out = "".join(seen) + proc.stdout.read()
    proc.wait(timeout=120)
    assert "checkpointing at step" in out, out[-4000:]
    assert out.count("checkpoint step") >= 1
    assert "shm_comm" not in out  # DeepSpeed's CPU shm all-reduce is left out (docs/RELIABILITY.md)
    run_dir = tmp_path / "cut"
    latest = int((run_dir / "checkpoints" / "latest").read_text().removeprefix("step"))
    assert 3 <= latest < STEPS, latest
    assert not (run_dir / "final_model.pt").exists()
    launch(["--auto-resume", *_args(shards, tmp_path, "cut")])
    got = torch.load(run_dir / "final_model.pt")
    for k in want_weights:
        torch.testing.assert_close(got[k], want_weights[k], rtol=0, atol=0, msg=k)
    assert _keys(run_dir) == want_keys  # per rank, per micro-step: nothing lost, nothing trained twice


def _single(shards_arg, out, *extra, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    flags = [e for e in extra if e.startswith("--")]
    sets = [e for e in extra if not e.startswith("--")]
    cmd = [sys.executable, str(ROOT / "pretrain.py"), "--config", "tiny_mae", *flags,
           *overrides(*TINY, f"data.train={shards_arg}", f"run.out_dir={out}", "run.name=r", "run.max_steps=4", *sets)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def _copy_shards(shards, dest):
    dest.mkdir()
    for f in shards.parent.iterdir():
        shutil.copy(f, dest / f.name)
    return dest / "manifest.json"


@pytest.mark.slow
def test_no_data_is_an_error_never_a_hang(shards, tmp_path):
    """Empty manifest, every shard missing, every shard unreadable, too few samples for one batch per worker:
    the run stops within 60 s, non-zero, saying how many shards were listed and how many could be read."""
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"shards": []}))
    proc, _ = _single(empty, tmp_path)
    assert proc.returncode != 0 and "0 listed" in proc.stdout + proc.stderr, proc.stdout[-2000:]

    gone = _copy_shards(shards, tmp_path / "gone")
    for tar in gone.parent.glob("*.tar"):
        tar.unlink()
    proc, _ = _single(gone, tmp_path)
    assert proc.returncode != 0 and "none of the 8 shards" in proc.stdout + proc.stderr, proc.stdout[-2000:]

    broken = _copy_shards(shards, tmp_path / "broken")
    for tar in broken.parent.glob("*.tar"):
        tar.write_bytes(b"not a tar file" * 100)
    proc, seconds = _single(broken, tmp_path, timeout=90)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 4 and "ended before its first step" in out and "8 shards listed" in out, out[-3000:]
    assert seconds < 60 and "Traceback" not in out

    proc, seconds = _single(shards, tmp_path, "data.batch_size=6", "data.num_workers=2", "run.name=small")
    out = proc.stdout + proc.stderr  # 32 clips over 2 workers at batch 6 train; at 20 per worker they do not
    assert proc.returncode == 0, out[-3000:]
    proc, seconds = _single(shards, tmp_path, "data.batch_size=20", "data.num_workers=2", "run.name=tiny")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 4 and "needs at least 20 readable samples" in out and seconds < 60, out[-3000:]


@pytest.mark.slow
def test_some_missing_shards_are_logged_once_and_counted(shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    part = _copy_shards(shards, tmp_path / "part")
    missing = sorted(part.parent.glob("*.tar"))[:2]
    for tar in missing:
        tar.unlink()
    proc, _ = _single(part, tmp_path, "run.max_steps=8", "run.log_every=2", "data.num_workers=1")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert out.count("2 of 8 shards listed") == 1 and all(out.count(t.name) == 1 for t in missing), out[-3000:]
    acc = EventAccumulator(str(tmp_path / "r" / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("data/faults")][-1] >= 2


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(shards, tmp_path):
    """A small tmpfs filled up after the first checkpoint: the next save stops the run (exit 5) naming the folder
    and the free space; `latest` still names the first checkpoint, no partial folder is left, and --auto-resume
    continues from it once there is space again."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24M", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs on this machine")
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        args = ["--config", "tiny_mae", *overrides(*TINY, f"data.train={shards}", f"run.out_dir={mnt}", "run.name=r",
                                                    "run.ckpt_every=10", "run.log_every=1", "data.num_workers=1")]
        proc = subprocess.Popen([sys.executable, str(ROOT / "pretrain.py"), *args, "--set", "run.max_steps=200"],
                                cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "checkpoint step00000010 written" in line:
                free = shutil.disk_usage(mnt).free
                with open(mnt / "filler", "wb") as f:  # leave 96 KiB: logs still fit, a checkpoint does not
                    f.write(b"\0" * max(free - 96 * 1024, 0))
                break
        out = "".join(seen) + proc.stdout.read()
        assert proc.wait(timeout=120) == 5, out[-3000:]
        ckpts = mnt / "r" / "checkpoints"
        assert f"cannot write checkpoint step00000020 to {ckpts}" in out and "MiB free there" in out, out[-3000:]
        assert (ckpts / "latest").read_text() == "step00000010"
        assert not (ckpts / "step00000020").exists()
        (mnt / "filler").unlink()
        resumed = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), *args, "--set", "run.max_steps=14",
                                  "--auto-resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
        assert resumed.returncode == 0 and "resumed at step 10" in resumed.stdout, resumed.stdout[-3000:]
        assert (ckpts / "latest").read_text() == "step00000014"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_hung_rank_reports_its_stacks_and_exits(shards, tmp_path):
    """A shard stream that stalls (a `pipe:` command that never sends a byte, as a hung object store does): after
    run.hang_timeout seconds without progress the rank says what it was waiting for, dumps its own and its data
    worker's stacks, and exits 6 instead of holding the allocation."""
    stall = tmp_path / "stall.sh"
    stall.write_text(f"sleep 600\ncat {shards.parent / 'synthetic-000000.tar'}\n")
    proc, seconds = _single(f"pipe:bash {stall}", tmp_path, "data.epoch_size=4", "data.num_workers=1",
                            "run.hang_timeout=4")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 6, out[-3000:]
    assert "made no progress for" in out and "while waiting for a batch from the data loader" in out, out[-3000:]
    assert "in _loop" in out  # the rank's main thread
    assert "in _worker_loop" in out and "in tar_file_iterator" in out, out[-3000:]  # the worker, stuck reading
    assert seconds < 60


@pytest.mark.slow
def test_data_workers_die_with_their_rank(shards, tmp_path):
    """kill -9 of a single-process run: its data-loader workers are gone within 10 s (no orphans)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = ["--config", "tiny_mae", *overrides(*TINY, f"data.train={shards}", f"run.out_dir={tmp_path}", "run.name=r",
                                                "run.max_steps=100000", "run.log_every=1", "data.num_workers=2")]
    proc = subprocess.Popen([sys.executable, str(ROOT / "pretrain.py"), *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in proc.stdout:
        if "step 2/" in line:
            break
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert len(workers) >= 2, workers
    proc.kill()
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, [p.pid for p in alive]


def test_a_data_worker_killed_under_one_rank_ends_the_job_with_exit_4_naming_it(shards, tmp_path):
    """SIGKILL (the out-of-memory killer) to one data worker of rank 1 in a 2-rank run: that rank says which worker
    of which rank died, how, and on which sample, and leaves with exit code 4 (a data error) at once; the launcher
    (torchrun here) stops rank 0. Before, torch's SIGCHLD handler raised its own "DataLoader worker ... is killed" wherever rank 1's
    main thread was (inside DeepSpeed, here), a traceback and exit code 1; and a DataError took the rank into the
    closing barrier, which is meant for ranks that all stop at the same point."""
    args = ["--config", "tiny_mae", *overrides(*TINY, f"data.train={shards}", f"run.out_dir={tmp_path}",
                                                "run.name=r", "run.max_steps=100000", "run.log_every=1",
                                                "data.num_workers=2", "run.hang_timeout=120")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(_launcher("torchrun", args), cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "step 3/" in line:
            break
    (rank1,) = _targets(proc, "rank_kill")
    victim = next(c for c in psutil.Process(rank1).children() if "pretrain.py" in " ".join(c.cmdline()))
    os.kill(victim.pid, signal.SIGKILL)
    t0 = time.monotonic()
    try:
        rest, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        rest, _ = proc.communicate()
        pytest.fail("the job did not end within 120 s of the worker's death:\n" + rest[-4000:])
    out = "".join(seen) + rest
    assert f"data worker 0 (pid {victim.pid}) of rank 1 died, killed by SIGKILL" in out or \
        f"data worker 1 (pid {victim.pid}) of rank 1 died, killed by SIGKILL" in out, out[-4000:]
    # torchrun's summary lists every failed rank with its exit code (deepspeed's launcher prints the last rank's
    # command with the code of whichever failed process it polled first: rank 0's 1, once it lost its peer)
    assert "data error:" in out and re.search(r"rank\s*: 1 \(local_rank: 1\)\s*exitcode\s*: 4 ", out), out[-4000:]
    assert "DataLoader worker" not in out, out[-4000:]  # torch's own message: raised somewhere, not ours
    assert time.monotonic() - t0 < 60


@pytest.mark.slow
def test_resume_under_other_settings_names_what_differs(shards, tmp_path):
    """The README's trap: a ZeRO-3 run pointed at a ZeRO-1 run's folder. Not DeepSpeed's `Empty ds_version in
    checkpoint`, but the settings that differ and what to do."""
    proc, _ = _single(shards, tmp_path, "run.stop_at=2", "run.ckpt_every=0")
    assert proc.returncode == 0, proc.stdout[-3000:]
    proc, _ = _single(shards, tmp_path, "engine.zero_stage=3", "--auto-resume")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 5 and "written with other settings (engine.zero_stage 1 → 3)" in out, out[-3000:]
    assert "Empty ds_version" not in out and "Traceback" not in out


LEFT_OPEN = """
import sys
from vssl_ds.config.schema import DataConfig
from vssl_ds.data.build import stream, view_from

d = DataConfig(train=sys.argv[1], batch_size=2, num_frames=4, sampling_rate=2, size=32, num_workers=2,
               resampled=True, epoch_size=10 ** 6, pin_memory=False)
loader, _ = stream(d, d.train, view_from(d), d.batch_size, None, 0, 1, 0)
batches = iter(loader)
print("batch", next(batches).video.shape, flush=True)
if sys.argv[2] == "raise":
    raise RuntimeError("the user's code failed")
"""


@pytest.mark.parametrize("how", ["raise", "return"])
def test_a_script_that_leaves_a_loader_open_exits(shards, tmp_path, how):
    """A script that stops iterating a loader without closing it, or fails while its traceback (which the
    interpreter keeps for printing) holds the loop: it exits at once with its workers gone. Before, it waited
    forever: at exit multiprocessing SIGTERMs and joins the workers, and the workers ignore SIGTERM."""
    script = tmp_path / "left_open.py"
    script.write_text(LEFT_OPEN)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), str(shards), how], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        pytest.fail("the script did not exit within 60 s of its last statement (the data workers kept it alive)")
    assert "batch torch.Size([2, 3, 4, 32, 32])" in out, out + err
    if how == "raise":
        assert proc.returncode == 1 and "the user's code failed" in err, err[-2000:]
    else:
        assert proc.returncode == 0, err[-2000:]


class _Stuck(torch.utils.data.IterableDataset):
    """One item, then a worker that ignores SIGTERM (as vssl_ds's do) and never returns: a hung read."""

    def __iter__(self):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        yield torch.zeros(1)
        time.sleep(3600)


def test_stopping_a_loader_kills_a_worker_stuck_mid_batch():
    """torch's shutdown gives a worker a few seconds, then sends SIGTERM, which vssl_ds's workers ignore: a worker
    stuck in a read would outlive the loop and hold the rank's exit. `stop_workers` kills it."""
    from vssl_ds.data.pipeline import stop_workers

    batches = iter(torch.utils.data.DataLoader(_Stuck(), batch_size=None, num_workers=1))
    assert next(batches).shape == (1,)
    workers = [psutil.Process(w.pid) for w in batches._workers]
    t0 = time.monotonic()
    stop_workers(batches)
    _, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive and time.monotonic() - t0 < 30


ENDS_UNDER_A_BUSY_THREAD = """
import atexit, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import torch
import torch.distributed
from vssl_ds.engine import dist

from vssl_ds.cli import console

torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
if not sys.argv[2].startswith("raise"):
    dist.shutdown()
a = torch.randn(1000, 1000)

def busy():  # stands for gloo's threads, which outlive destroy_process_group while DeepSpeed holds the groups
    while True:
        torch.mm(a, a)

threading.Thread(target=busy, daemon=True).start()
pool = ThreadPoolExecutor(1)  # an executor left open: its idle thread ends only through the interpreter's exit hooks
pool.submit(int).result()
atexit.register(lambda: Path(sys.argv[1]).write_text("exit handlers ran"))
time.sleep(0.3)
print("finished", end="")  # unflushed when the process ends

def main():  # an error that escapes a command while its process group is up
    raise RuntimeError("something unexpected in the rank")

if sys.argv[2] == "raise":
    console(main)()
elif sys.argv[2] == "raise_ordinary":
    main()
dist.leave(7) if sys.argv[2] == "leave" else sys.exit(7)
"""


def _end_under_a_busy_thread(tmp_path, how: str) -> subprocess.CompletedProcess:
    """ENDS_UNDER_A_BUSY_THREAD ended `how`; its exit handlers ran and its unflushed output came out."""
    script = tmp_path / "ends.py"
    script.write_text(ENDS_UNDER_A_BUSY_THREAD)
    marker = tmp_path / f"{how}.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(script), str(marker), how], env=env, capture_output=True, text=True,
                         timeout=60)
    assert marker.read_text() == "exit handlers ran" and run.stdout == "finished", run
    return run


def test_a_finished_rank_exits_with_its_code_although_cpp_threads_still_run(tmp_path):
    """A rank ends through `dist.leave` (the entry points' shims and console scripts): a thread still inside torch's
    C++ code when the interpreter tears down aborts the process with `terminate called without an active exception`
    (the ordinary exit below shows it). gloo's threads are such threads once DeepSpeed holds the groups past
    destroy_process_group; a 2-rank README run in CI finished its work and failed on it. `leave` runs the exit
    handlers, flushes the output and skips the teardown: the code the rank returned, nothing lost."""
    runs = {how: _end_under_a_busy_thread(tmp_path, how) for how in ("leave", "ordinary")}
    assert runs["leave"].returncode == 7 and "terminate" not in runs["leave"].stderr, runs["leave"].stderr[-2000:]
    # the hazard the test is about: if this ever exits 7, torch no longer aborts here and `leave` can be revisited
    ordinary = runs["ordinary"]
    assert ordinary.returncode == -signal.SIGABRT, (ordinary.returncode, ordinary.stderr[-2000:])


def test_an_error_escaping_a_rank_is_printed_and_exits_1_not_an_abort(tmp_path):
    """An unexpected error that leaves a command's main() while the process group is up: its traceback as Python
    prints it, the exit handlers, exit code 1 (through `cli.console`), where the ordinary ending of the same script
    aborts in the teardown (SIGABRT after the traceback) and a launcher or SLURM reports a crash, not the error."""
    runs = {how: _end_under_a_busy_thread(tmp_path, how) for how in ("raise", "raise_ordinary")}
    for run in runs.values():
        assert "RuntimeError: something unexpected in the rank" in run.stderr, run.stderr[-2000:]
    assert runs["raise"].returncode == 1 and "terminate" not in runs["raise"].stderr, runs["raise"].stderr[-2000:]
    assert "Traceback (most recent call last)" in runs["raise"].stderr
    ordinary = runs["raise_ordinary"]
    assert ordinary.returncode == -signal.SIGABRT, (ordinary.returncode, ordinary.stderr[-2000:])
