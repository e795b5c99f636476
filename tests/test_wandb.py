"""Weights & Biases logging (run.wandb=true): a real offline run whose record file holds the same scalars as
TensorBoard, the monitor's picture and the config, and continues the same W&B run on resume; a missing package, a
failed start and a failed call are each one warning, never a stopped run."""
import glob
import json
import logging
import os
import struct
import subprocess
import sys
import types

import pytest
import torch

from conftest import ROOT, TINY, overrides
from vssl_ds.logging import Scalars


def wandb_records(path: str):
    """The protobuf records of a W&B run file (`run-<id>.wandb`: a 7-byte header, then LevelDB's log format: 32 KiB
    blocks of chunks with a 7-byte header: crc32c, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, pending = open(path, "rb").read(), 7, 32768, b""
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


@pytest.mark.slow
def test_an_offline_run_logs_what_tensorboard_logs_and_resumes_the_same_wandb_run(shards, tmp_path):
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_SILENT": "true"}
    sets = [*TINY, f"data.train={shards}", f"run.out_dir={tmp_path}", "run.name=wb", "run.max_steps=4",
            "run.wandb=true", "run.wandb_mode=offline", "run.wandb_project=vssl_test", "monitor.every=2",
            "monitor.clips=4", "monitor.images=1", "data.num_workers=1", "run.ckpt_every=2"]
    for extra in (["run.stop_at=2"], ["--auto-resume"]):
        args = ["--auto-resume"] if extra == ["--auto-resume"] else []
        proc = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), *args, "--config", "tiny_mae",
                               *overrides(*sets, *[e for e in extra if e.startswith("run.")])],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "W&B could not" not in proc.stdout + proc.stderr
    run = tmp_path / "wb"
    run_id = (run / "wandb_id").read_text()
    files = sorted(glob.glob(str(run / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb")))
    assert len(files) == 2, files  # the first part and the resumed part: one W&B run id
    history, images, config = {}, set(), None
    for f in files:
        for record in wandb_records(f):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
                step = int(items["_step"])
                for key, value in items.items():
                    if key.startswith("monitor/reconstruction"):
                        images.add(step)
                    elif not key.startswith("_") and not value.startswith("{"):
                        history.setdefault(key, {})[step] = float(value)
            elif kind == "run" and record.run.config.update:
                config = {i.key: json.loads(i.value_json) for i in record.run.config.update}
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    for tag in ("train/loss", "opt/lr", "monitor/rankme"):
        tb = {e.step: e.value for e in acc.Scalars(tag)}
        assert set(tb) == set(history[tag]) and len(tb) == 2, (tag, tb, history.get(tag))
        for step, value in tb.items():
            assert history[tag][step] == pytest.approx(value, rel=1e-6), (tag, step)
    assert images == {2, 4}  # the MAE reconstructions, as in TensorBoard
    config = {k: v.get("value", v) if isinstance(v, dict) else v for k, v in config.items()}
    assert config["method"]["name"] == "mae" and config["run"]["name"] == "wb", config.get("run")


class _Recorder:
    def __init__(self):
        self.logged, self.finished = [], False

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


def _fake_wandb(init):
    module = types.ModuleType("wandb")
    module.init = init
    module.Image = lambda array: ("image", array.shape)
    module.Html = lambda text: ("html", text)
    return module


def _settings(tmp_path):
    return {"project": "p", "entity": "", "mode": "online", "run_dir": tmp_path, "name": "n", "config": {}}


def test_a_missing_package_or_a_failed_start_is_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with caplog.at_level(logging.WARNING):
        s = Scalars(tmp_path / "tb", _settings(tmp_path))
        s.add({"train/loss": 1.0}, 1)
        s.close()
    assert s.wandb is None and "pip install wandb" in caplog.text

    def no_network(**kwargs):
        raise ConnectionError("api.wandb.ai unreachable")

    caplog.clear()
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(no_network))
    with caplog.at_level(logging.WARNING):
        s = Scalars(tmp_path / "tb2", _settings(tmp_path))
        s.add({"train/loss": 1.0}, 1)
        s.close()
    assert "W&B could not start" in caplog.text and "run.wandb_mode=offline" in caplog.text
    assert list((tmp_path / "tb2").glob("events.out.tfevents.*"))  # TensorBoard went on


def test_scalars_images_and_texts_reach_wandb_and_a_failed_call_turns_it_off(tmp_path, monkeypatch, caplog):
    run = _Recorder()
    seen = {}

    def init(**kwargs):
        seen.update(kwargs)
        return run

    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(init))
    s = Scalars(tmp_path / "tb", _settings(tmp_path))
    assert seen["resume"] == "allow" and (tmp_path / "wandb_id").read_text() == seen["id"]  # kept for a resume
    s.add({"train/loss": 0.5}, 3)
    s.image("monitor/reconstruction", torch.rand(3, 8, 6), 3)
    s.text("monitor/alarm", "rank <fell>", 4)
    assert run.logged == [(3, {"train/loss": 0.5}), (3, {"monitor/reconstruction": ("image", (8, 6, 3))}),
                          (4, {"monitor/alarm": ("html", "<pre>rank &lt;fell&gt;</pre>")})]

    def broken(data, step):
        raise OSError("disk full")

    run.log = broken
    with caplog.at_level(logging.WARNING):
        s.add({"train/loss": 0.4}, 5)
        s.add({"train/loss": 0.3}, 6)
    assert caplog.text.count("W&B logging failed") == 1 and s.wandb is None
    s.close()
