import json

import pytest

from vssl_ds.engine.deepspeed import check_ds_config
from vssl_ds.engine.ds_config import PRESETS, build_ds_config, preset_config
from vssl_ds.config import load_config
from vssl_ds.tools.make_ds_configs import main as make_ds_configs, render

from conftest import ROOT


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_checked_in_file_matches_the_generator(name):
    path = ROOT / "ds_configs" / f"{name}.json"
    assert path.is_file(), f"{path} missing: run python tools/make_ds_configs.py"
    assert path.read_text() == render(name), f"{path} drifted: run python tools/make_ds_configs.py"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_deepspeed_accepts_each_preset(name):
    cfg = json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())
    assert "train_batch_size" not in cfg  # world-size specific: never in a file
    check_ds_config(cfg, world_size=64)


def test_check_mode_detects_drift(tmp_path):
    assert make_ds_configs(["--out", str(tmp_path)]) == 0
    assert make_ds_configs(["--out", str(tmp_path), "--check"]) == 0
    (tmp_path / "cpu.json").write_text(render("cpu").replace('"stage": 1', '"stage": 2'))
    assert make_ds_configs(["--out", str(tmp_path), "--check"]) == 1


def test_deepspeed_rejects_a_broken_config():
    bad = preset_config("cpu")
    bad["zero_optimization"]["stagee"] = 1
    with pytest.raises(Exception, match="stagee"):
        check_ds_config(bad)


def test_offload_rules_and_user_json(tmp_path):
    with pytest.raises(ValueError, match="engine.offload_param: .*needs engine.zero_stage=3"):  # at load time
        load_config(None, ["engine.zero_stage=2", "engine.offload_param=cpu"])
    user = tmp_path / "extra.json"
    user.write_text(json.dumps({"comms_logger": {"enabled": True}, "zero_optimization": {"stage": 0}}))
    ds = build_ds_config(load_config(None, [f"engine.ds_config={user}", "engine.zero_stage=2"]), "fp32")
    assert ds["comms_logger"] == {"enabled": True} and ds["zero_optimization"]["stage"] == 2  # typed config wins
    user.write_text(json.dumps({"train_batch_size": 1024}))
    with pytest.raises(ValueError, match="train_batch_size"):
        build_ds_config(load_config(None, [f"engine.ds_config={user}"]), "fp32")
