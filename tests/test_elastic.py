"""Resuming on another number of ranks or data workers (docs/RELIABILITY.md, "Elastic resume").

A run stopped at step 3 of an 8-step epoch (32 clips, global batch 4) is resumed on another world size:
- the model, fp32 master weights and AdamW moments the re-partitioned engine holds equal the checkpoint's consolidated
  ones (weights: DeepSpeed's zero_to_fp32 over the saved partitions; moments: the universal checkpoint's files);
- engine.grad_accum is set so the global batch stays 4;
- the epoch ends with every one of the 32 clips trained exactly once over both runs (key lists of every rank);
- a data.batch_size with which no whole accumulation keeps the global batch is refused, saying what to set.
"""
import collections
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, free_port, launch, overrides

SETS = [*TINY, "run.max_steps=8", "run.log_every=1", "run.record_keys=true"]


def _sets(shards, out, stage, workers, *extra):
    return [*SETS, f"data.train={shards}", f"run.out_dir={out}", "run.name=e", f"engine.zero_stage={stage}",
            f"data.num_workers={workers}", *extra]


def _probe(sets: list[str], ranks: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    script = str(ROOT / "tests" / "helpers" / "resume_probe.py")
    if ranks == 1:
        cmd = [sys.executable, script, "tiny_mae", *sets]
    else:
        runner = str(ROOT / ".venv" / "bin" / "deepspeed") if (ROOT / ".venv" / "bin" / "deepspeed").exists() \
            else "deepspeed"
        cmd = [runner, "--num_gpus", str(ranks), "--master_port", str(free_port()), script, "tiny_mae", *sets]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("PROBE ")), None)
    assert proc.returncode == 0 and line, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(line[6:])


@pytest.mark.slow
@pytest.mark.parametrize("stage,before,after,workers_before,workers_after,to_the_end", [
    (1, 2, 1, 2, 2, True),    # ZeRO-1, 2 → 1 ranks; then trained to the end of the epoch
    (3, 1, 2, 2, 1, True),    # ZeRO-3, 1 → 2 ranks and 2 → 1 data workers; to the end
    (1, 1, 2, 2, 2, False),   # ZeRO-1, 1 → 2: the state only
    (3, 2, 1, 2, 2, False),   # ZeRO-3, 2 → 1: the state only
])
def test_resume_on_another_world_size(shards, tmp_path, stage, before, after, workers_before, workers_after,
                                      to_the_end):
    accum_before = 4 // (2 * before)  # data.batch_size 2: global batch 4 either way
    first = _sets(shards, tmp_path, stage, workers_before, f"engine.grad_accum={accum_before}", "run.stop_at=3")
    launch(["--config", "tiny_mae", *overrides(*first)], ranks=before)

    if after == 1 and stage == 1:  # batch 3 on 1 rank: no whole accumulation makes the global batch of 4
        proc = launch(["--auto-resume", "--config", "tiny_mae",
                       *overrides(*_sets(shards, tmp_path, stage, workers_after, "data.batch_size=3"))], ranks=1,
                      check=False)
        out = proc.stdout + proc.stderr
        assert "global batch of 4 clips" in out and "data.batch_size" in out and "Traceback" not in out, out[-3000:]

    resumed = _sets(shards, tmp_path, stage, workers_after, f"engine.grad_accum={accum_before}")
    probe = _probe(resumed, after)
    assert probe["world"] == after and probe["step"] == 3
    assert probe["grad_accum"] == 4 // (2 * after)  # set for the user, from the checkpoint's global batch
    assert probe["diff"] == {"fp32": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}, probe
    assert probe["moment_mass"] > 0  # moments were restored, not zeros

    if not to_the_end:
        return
    proc = launch(["--auto-resume", "--config", "tiny_mae", *overrides(*resumed)], ranks=after)
    out = proc.stdout + proc.stderr
    assert f"world size {before} → {after}" in out and "goes on with the samples no rank has trained" in out, out[-3000:]
    run = tmp_path / "e"
    seen = collections.Counter()
    for f in (run / "keys").glob("rank*.jsonl"):
        for row in map(json.loads, f.read_text().splitlines()):
            seen.update(row["keys"])
    assert len(seen) == 32 and set(seen.values()) == {1}, seen  # the whole epoch, each clip once
    digests = json.loads((run / "final_digests.json").read_text())
    assert digests["step"] == 8 and len(set(digests["ranks"])) == 1 and len(digests["ranks"]) == after
