"""The README, followed block by block as a new user would, in one working folder.

Every ```bash command runs as written, in README order, except:
- commands for a cluster (paths under /data, /shards or /models, more than 2 GPUs, a user's own recipe file, the
  GPU benchmark) are checked, not run: their arguments go through the tool's own parser and their recipe and
  overrides through the config loader and its validation (a misspelt key or option fails here);
- `pretrain.py` / `tools/evaluate.py` runs get `--set run.max_steps=3 --set run.log_every=1` (shorter runs);
- the install in the quick start is what CI's .ci/run runs first, and the test command is this run.
```python blocks must import what they use. The toy runs' logs are then checked: every method's losses finite.
A README change that breaks a command fails here.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow

CAP = " --set run.max_steps=3 --set run.log_every=1"
CLUSTER = re.compile(r"(^|[\s=])/(data|shards|models)/|my_recipe\.yaml|tools/benchmark\.py gpu")
TOY_RUNS = ["toy_mae", "toy_mvd", "toy_bevt", "toy_bevt_image", "toy_bevt_joint", "toy_vicmae", "toy_iboot",
            "toy_iboot_cached", "mvd_toy",
            "mvd_toy_cached", *(f"toy_lstcl_{fw}_{bb}" for fw in ("mocov3", "byol", "simsiam") for bb in ("vit", "swin"))]
TOY_EVALS = ["toy_finetune", "toy_linear", "toy_attentive", "toy_knn", "toy_linear_random", "tiny_linear_probe",
             "tiny_knn"]


def blocks(text: str) -> list[tuple[int, str, list[str]]]:
    """[(line number, language, lines)] of the fenced blocks."""
    out, lang, start, body = [], None, 0, []
    for i, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, start, body = line[3:].strip(), i + 1, []
            else:
                out.append((start, lang, body))
                lang = None
        elif lang is not None:
            body.append(line)
    return out


def commands(start: int, lines: list[str]) -> list[tuple[int, str]]:
    """Shell units of a bash block: continuation lines joined, a heredoc or a for-loop kept whole."""
    units, i = [], 0
    while i < len(lines):
        line, first = lines[i], start + i
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        unit = line
        while unit.endswith("\\") and i < len(lines):
            unit, i = unit[:-1].rstrip() + " " + lines[i].strip(), i + 1
        heredoc = re.search(r"<<'?(\w+)'?", unit)
        if heredoc:
            while i < len(lines) and lines[i].strip() != heredoc.group(1):
                unit, i = unit + "\n" + lines[i], i + 1
            unit, i = unit + "\n" + heredoc.group(1), i + 1
        elif re.match(r"\s*for\b", unit):
            while i < len(lines) and lines[i].strip() != "done":
                part = lines[i]
                i += 1
                while part.endswith("\\") and i < len(lines):
                    part, i = part[:-1].rstrip() + " " + lines[i].strip(), i + 1
                unit += "\n" + part
            unit, i = unit + "\ndone", i + 1
        units.append((first, unit))
    return units


def capped(unit: str) -> str:
    """Each pretrain.py / tools/evaluate.py line of `unit` with CAP appended (a for-loop's body line included)."""
    def cap(line: str) -> str:
        if not re.search(r"(pretrain|tools/evaluate)\.py\b", line) or "--print-config" in line:
            return line
        command, comment = re.match(r"(.*?)(\s+#.*)?$", line).groups()  # before a trailing comment
        return command + CAP + (comment or "")
    return "\n".join(cap(line) for line in unit.split("\n"))


def iterations(unit: str) -> list[str]:
    """A `for V in A B …; do BODY; done` unit → one script per value; any other unit → [unit]."""
    head = re.match(r"\s*for (\w+) in (.*?); do\n(.*)\ndone$", unit, re.S)
    if not head:
        return [unit]
    var, words, body = head.groups()
    return [re.sub(r"\$\{?" + var + r"\b\}?", word, body) for word in words.split()]


def dry_run(unit: str) -> None:
    """Parse a cluster command with its tool's parser; load its recipe + overrides through the config loader."""
    argv = [a for a in shlex.split(unit, comments=True) if not re.fullmatch(r"[A-Z_]+=\S*", a)]
    script = next((a for a in argv if a.endswith(".py")), None)
    assert script, f"no script in {unit!r}"
    rest = argv[argv.index(script) + 1:]
    module = {"pretrain.py": "vssl_ds.train", "tools/evaluate.py": "vssl_ds.eval.run"}.get(
        script, f"vssl_ds.tools.{Path(script).stem}")
    parse = getattr(importlib.import_module(module), "parse_args")
    try:
        args = parse(rest)
    except SystemExit as e:
        raise AssertionError(f"{script} rejects the README's arguments {rest}") from e
    config = getattr(args, "config", None)
    if config and not (config.endswith((".yaml", ".yml")) and not Path(config).is_file()):
        from vssl_ds.config import load_config

        load_config(config, args.set)


@pytest.fixture(scope="module")
def followed(tmp_path_factory) -> tuple[Path, list[str]]:
    """A working folder in which every README block ran → (folder, what was done per command)."""
    cwd = tmp_path_factory.mktemp("readme")
    for name in ("pretrain.py", "tools", "ds_configs", "launchers"):
        (cwd / name).symlink_to(ROOT / name)
    (cwd / ".venv").symlink_to(Path(sys.executable).parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = []
    for start, lang, lines in blocks((ROOT / "README.md").read_text()):
        if lang == "python":
            exec(compile("\n".join(l for l in lines if re.match(r"(from|import) ", l)), f"README.md:{start}", "exec"))
            done.append(f"{start}: imports")
            continue
        if lang != "bash":
            continue
        for line, unit in commands(start, lines):
            if "pytest" in unit:
                done.append(f"{line}: this test run")
                continue
            unit = re.sub(r"^bash tools/install\.sh && ", "", unit)  # .ci/run installs exactly so, first
            if CLUSTER.search(unit) or any(int(n) > 2 for n in re.findall(r"--num_gpus\s+(\d+)", unit)):
                dry_run(unit)
                done.append(f"{line}: checked {unit.split(chr(10))[0][:60]}")
                continue
            t0 = time.monotonic()
            with ThreadPoolExecutor(2) as pool:  # a loop's iterations are independent: two at a time (2 cores)
                for script, proc in zip(*(lambda s: (s, pool.map(lambda x: subprocess.run(
                        ["bash", "-euo", "pipefail", "-c", x], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=900), s)))(iterations(capped(unit)))):
                    assert proc.returncode == 0, (f"README.md:{line} failed ({proc.returncode}):\n{script}\n"
                                                  f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
            done.append(f"{line}: ran {unit.split(chr(10))[0][:60]} ({time.monotonic() - t0:.0f} s)")
            print(done[-1], flush=True)  # with -s: where the README test's minutes go
    return cwd, done


def _scalars(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {tag: [s.value for s in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.timeout(1800)  # the fixture follows the whole README (about 8 minutes on 2 cores)
def test_every_readme_command_works(followed):
    cwd, done = followed
    print("\n".join(done))
    ran = [d for d in done if ": ran " in d]
    assert len(ran) >= 15 and any("checked" in d for d in done), done
    assert (cwd / "runs/tiny_mae/final_model.pt").is_file() and (cwd / "data/demo_shards/manifest.json").is_file()
    # the quick start: no data given → generated shards, TensorBoard events, a checkpoint
    assert (cwd / "data/synthetic/manifest.json").is_file() and (cwd / "runs/tiny_mae/checkpoints/latest").is_file()
    assert list((cwd / "runs/tiny_mae/tb").glob("events.out.tfevents.*"))


# what the health monitor adds to each toy_* run (monitor.every=3; CAP stops at step 3): its picture, and alignment /
# uniformity for the two-clip methods (the image-only BEVT stage has no video to probe)
MONITOR_IMAGE = {"toy_mae": "reconstruction", "toy_vicmae": "reconstruction", "toy_mvd": "token_error",
                 "toy_bevt": "token_accuracy", "toy_bevt_joint": "token_accuracy"}
TWO_CLIP = ("toy_vicmae", "toy_iboot", "toy_iboot_cached", "toy_lstcl_")


@pytest.mark.parametrize("name", TOY_RUNS)
def test_every_method_trains_at_toy_size(followed, name):
    """Each toy run of the README: 3 logged steps, the total loss and at least one term, all finite; the toy_* runs
    also carry the health monitor's curves and pictures."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = _scalars(followed[0] / "runs" / name)
    logged = {k: v for k, v in scalars.items() if k == "train/loss" or k.startswith("loss/")}
    assert len(logged.get("train/loss", [])) >= 1 and len(logged) > 1, logged
    assert all(math.isfinite(v) for values in logged.values() for v in values), logged
    assert (followed[0] / "runs" / name / "final_model.pt").is_file()
    if not name.startswith("toy_") or name == "toy_bevt_image":
        return
    assert len(scalars["monitor/rankme"]) >= 1 and all(math.isfinite(v) for v in scalars["monitor/feat_std_mean"])
    if name.startswith(TWO_CLIP):
        assert len(scalars["monitor/alignment"]) >= 1 and all(v <= 0 for v in scalars["monitor/uniformity"]), scalars
    else:
        assert "monitor/alignment" not in scalars
    acc = EventAccumulator(str(followed[0] / "runs" / name / "tb"), size_guidance={"images": 0})
    acc.Reload()
    images = [t for t in acc.Tags()["images"] if t.startswith("monitor/")]
    assert images == ([f"monitor/{MONITOR_IMAGE[name]}"] if name in MONITOR_IMAGE else []), images


@pytest.mark.parametrize("name", TOY_EVALS)
def test_every_evaluation_mode_reports(followed, name):
    result = json.loads((followed[0] / "runs" / name / "results.json").read_text())
    assert math.isfinite(result["top1"]) and 0.0 <= result["top1"] <= 100.0, result
    assert (result["weights"] is None) == (name == "toy_linear_random"), result


@pytest.mark.parametrize("name", ["demo", "mvd_toy", "mvd_toy_cached"])
def test_the_readme_two_rank_runs_end_with_the_same_weights_on_both_ranks(followed, name):
    """The README's `deepspeed --num_gpus 2` runs (the tiny MAE on real footage, MVD online and from its teacher
    cache): both ranks reach the last step with identical weights."""
    digests = json.loads((followed[0] / "runs" / name / "final_digests.json").read_text())
    assert digests["step"] == 3 and len(digests["ranks"]) == 2 and len(set(digests["ranks"])) == 1, digests
