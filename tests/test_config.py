import pytest

from vssl_ds.config import ConfigError, list_recipes, load_config
from vssl_ds.train import main


def test_every_recipe_loads():
    names = list_recipes()
    assert {"tiny_mae", "videomae_vit_b"} <= set(names)
    for name in names:
        load_config(name)


def test_recipe_inherits_and_overrides_win():
    cfg = load_config("tiny_mae", ["optim.blr=3e-4", "data.scales=[1.0,0.5]"])
    assert cfg.method.mae.mask_ratio == 0.9  # from the parent videomae_vit_b
    assert cfg.model.name == "vit_tiny_video"  # the child's own value
    assert cfg.optim.blr == pytest.approx(3e-4) and cfg.data.scales == [1.0, 0.5]


@pytest.mark.parametrize("override, expect", [
    ("optim.lrr=1", "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("model.pach=8", "unknown key 'model.pach'; did you mean 'model.patch'?"),
    ("engine.zero=2", "did you mean 'engine.zero_stage'?"),
    ("data.batch_size=abc", "bad value for 'data.batch_size'"),
    ("engine.zero_stage=5", "'engine.zero_stage' is 5; choose one of 0, 1, 2, 3"),
    ("run.max_steps", "must look like section.key=value"),
    ("data.flip=1.5", "data.flip: 1.5 is not a probability"),
])
def test_bad_overrides_fail_with_the_key_named(override, expect):
    with pytest.raises(ConfigError, match=expect.replace("?", r"\?").replace("(", r"\(")):
        load_config("tiny_mae", [override])


def test_unknown_key_in_a_recipe_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("inherit: tiny_mae\nmethod:\n  mae:\n    mask_ration: 0.5\n")
    with pytest.raises(ConfigError, match=r"mine.yaml: unknown key 'method.mae.mask_ration'; did you mean 'method.mae.mask_ratio'"):
        load_config(str(path))


def test_unknown_recipe_suggests(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'tiny_mae'"):
        load_config("tiny_mea")


def test_cli_reports_config_errors_before_any_work(capsys):
    assert main(["--config", "tiny_mae", "--set", "optim.wd=0.1"]) == 2
    assert "unknown key 'optim.wd'" in capsys.readouterr().err


def test_print_config_shows_resolved_values(capsys):
    assert main(["--config", "tiny_mae", "--set", "run.name=x", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "name: x" in out and "mask_ratio: 0.9" in out


@pytest.mark.parametrize("module", ["vssl_ds.train", "vssl_ds.eval.run", "vssl_ds.tools.make_shards",
                                    "vssl_ds.tools.inspect_shards", "vssl_ds.tools.export", "vssl_ds.tools.cache_teachers",
                                    "vssl_ds.tools.fit_tokenizer", "vssl_ds.tools.model_stats", "vssl_ds.tools.benchmark"])
def test_every_tool_help_is_whole_and_shows_defaults(module, capsys):
    import importlib

    mod = importlib.import_module(module)
    with pytest.raises(SystemExit) as e:
        if module in ("vssl_ds.tools.model_stats", "vssl_ds.tools.fit_tokenizer"):
            mod.main(["--help"])
        elif module == "vssl_ds.tools.benchmark":
            mod.parse_args(["gpu", "--help"])
        else:
            mod.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "(default:" in out, out
    doc = (mod.__doc__ or "").strip()
    if module not in ("vssl_ds.train", "vssl_ds.tools.benchmark") and "\n\n" in doc:  # the whole description, not its first paragraph only
        assert doc.split("\n\n")[1].strip().splitlines()[0] in out


def test_a_recipe_inherits_from_several_parents_in_order(tmp_path):
    """`inherit: [a, b]`: b overrides a, the recipe overrides both (how the toy recipes add their parts)."""
    (tmp_path / "part.yaml").write_text("data:\n  size: 48\n  batch_size: 3\nmodel:\n  img_size: 48\n")
    (tmp_path / "r.yaml").write_text("inherit: [tiny_mae, part.yaml]\ndata:\n  batch_size: 5\n")
    cfg = load_config(str(tmp_path / "r.yaml"))
    assert (cfg.data.size, cfg.model.img_size, cfg.data.batch_size, cfg.model.name) == (48, 48, 5, "vit_tiny_video")
    (tmp_path / "loop.yaml").write_text("inherit: [tiny_mae, loop.yaml]\n")
    with pytest.raises(ConfigError, match="inheritance loops"):
        load_config(str(tmp_path / "loop.yaml"))
    (tmp_path / "bad.yaml").write_text("inherit: {a: 1}\n")
    with pytest.raises(ConfigError, match="must be a recipe name or a list"):
        load_config(str(tmp_path / "bad.yaml"))


def test_synthetic_task_choices_are_the_generators():
    from vssl_ds.config.schema import CHOICES
    from vssl_ds.data.synthetic import TASKS

    assert set(CHOICES["data.synthetic_task"]) == set(TASKS)
    with pytest.raises(ConfigError, match="data.synthetic_task"):
        load_config("tiny_mae", ["data.synthetic_task=squares"])
