"""Export and downstream evaluation: ZeRO-3 checkpoint → safetensors round trip, timm loading of 2D encoders,
kNN voting, and every evaluation mode end to end with two DeepSpeed ranks."""
import json
import math

import numpy as np
import pytest
import torch

from conftest import TINY, launch, overrides
from vssl_ds.eval.data import spread_crops, spread_clips
from vssl_ds.eval.knn import leave_one_out_top1, vote
from vssl_ds.eval.metrics import TopK
from vssl_ds.models import create_model
from vssl_ds.models.exported import load_exported, save_exported

EVAL_DATA = ["data.num_frames=8", "data.sampling_rate=2", "data.size=32", "data.num_workers=1",
             "eval.test_clips=2", "eval.test_crops=2", "eval.test_batch_size=2"]


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory):
    from vssl_ds.data.synthetic import write_synthetic_shards

    return write_synthetic_shards(tmp_path_factory.mktemp("val"), clips=12, shards=3, frames=24, size=48, seed=7)


@pytest.fixture(scope="module")
def pretrained(shards, tmp_path_factory):
    """A tiny MAE trained 4 steps by 2 ranks under ZeRO-3, and its exported encoder."""
    from vssl_ds.tools.export import main as export

    out = tmp_path_factory.mktemp("pre")
    launch(overrides(*TINY, f"data.train={shards}", f"run.out_dir={out}", "run.name=mae", "run.max_steps=4",
                     "engine.zero_stage=3"))
    assert export([str(out / "mae"), "--out", str(out / "enc.safetensors")]) == 0
    return out / "mae", out / "enc.safetensors"


def test_export_round_trip_from_zero3_gives_identical_features(pretrained):
    run, weights = pretrained
    info = json.loads(weights.with_suffix(".json").read_text())
    assert info["method"] == "mae" and info["step"] == 4 and info["model"]["name"] == "vit_micro_video"
    model, _ = load_exported(weights)
    # the reference: the trainer's own consolidated fp32 weights (final_model.pt), loaded by hand
    ref = create_model("vit_micro_video", img_size=32, num_frames=8, patch=8)
    full = torch.load(run / "final_model.pt")
    ref.load_state_dict({k[len("encoder."):]: v for k, v in full.items() if k.startswith("encoder.")})
    x = torch.randn(2, 3, 8, 32, 32)
    assert torch.equal(model.eval()(x), ref.eval()(x))
    assert weights.stat().st_mode & 0o044 == 0o044  # readable by the group and others (safetensors makes 0600)


def test_exported_2d_encoder_loads_into_timm(tmp_path):
    import timm
    from safetensors.torch import load_file

    from vssl_ds.config.schema import ModelConfig

    torch.manual_seed(0)
    m = ModelConfig(name="vit2d_micro_patch16", img_size=32, patch=16, pos_embed="sincos2d")
    ours = create_model(m.name, img_size=32, pos_embed="sincos2d").eval()
    info = save_exported(ours, m, {}, tmp_path / "enc.safetensors", {"method": "vicmae", "step": 0})
    theirs = timm.create_model(info["timm"]["name"], pretrained=False, **info["timm"]["kwargs"]).eval()
    theirs.load_state_dict(load_file(str(tmp_path / "enc.safetensors")))  # strict: timm's own names
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(theirs.forward_features(x), ours(x), atol=1e-5)
    again, _ = load_exported(tmp_path / "enc.safetensors")
    assert torch.allclose(again.eval()(x), ours(x), atol=1e-6)


def test_knn_vote_weights_neighbours_by_similarity():
    bank = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    query = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2], [0.2, 1.0]]), dim=1)
    scores = vote(query, bank, labels, num_classes=3, k=3, t=0.1)
    sims = query @ bank.T
    top = sims.topk(3, dim=1)
    expect = torch.zeros(2, 3)
    for i in range(2):
        for s, j in zip(top.values[i], top.indices[i]):
            expect[i, labels[j]] += torch.exp(s / 0.1)
    assert torch.allclose(scores, expect) and scores.argmax(1).tolist() == [0, 1] and (scores[:, 2] == 0).all()


def _loo_by_hand(feats, labels, k, t, standardize):
    """The monitor's probe written out clip by clip in plain Python (no torch vectorised code)."""
    rows = feats.tolist()
    dims = len(rows[0])
    if standardize:
        mean = [sum(r[d] for r in rows) / len(rows) for d in range(dims)]
        std = [max((sum((r[d] - mean[d]) ** 2 for r in rows) / (len(rows) - 1)) ** 0.5, 1e-6) for d in range(dims)]
        rows = [[(r[d] - mean[d]) / std[d] for d in range(dims)] for r in rows]
    rows = [[v / sum(x * x for x in r) ** 0.5 for v in r] for r in rows]
    right = 0
    for i, q in enumerate(rows):
        sims = sorted(((sum(a * b for a, b in zip(q, r)), j) for j, r in enumerate(rows) if j != i), reverse=True)[:k]
        votes = {}
        for s, j in sims:
            votes[int(labels[j])] = votes.get(int(labels[j]), 0.0) + math.exp(s / t)
        right += max(votes, key=votes.get) == int(labels[i])
    return 100.0 * right / len(rows)


@pytest.mark.parametrize("standardize", [True, False])
def test_monitor_leave_one_out_knn_matches_a_clip_by_clip_count(standardize):
    """Clusters along a few dimensions, under one large shared offset and one dimension of large scale (what
    masked-modelling features look like): the vote must never count a clip for itself, and standardising the
    dimensions must be what recovers the clusters."""
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(30) % 3
    feats = torch.randn(30, 6, generator=g) * 0.3
    feats[torch.arange(30), labels] += 1.0  # class c is larger along dimension c
    feats[:, 4] = 50.0 + 0.5 * torch.randn(30, generator=g)  # shared offset, no class information
    feats[:, 5] = 20.0 * torch.randn(30, generator=g)  # large scale, no class information
    got = leave_one_out_top1(feats, labels, k=5, t=0.07, standardize=standardize)
    assert got == pytest.approx(_loo_by_hand(feats, labels, 5, 0.07, standardize))
    if standardize:
        assert got >= 80.0 > leave_one_out_top1(feats, labels, k=5, t=0.07, standardize=False)
    same = torch.zeros(4, 3)  # identical clips: leaving one out, each is outvoted by the other class
    assert leave_one_out_top1(same, torch.tensor([0, 0, 1, 1]), k=3, t=0.07, standardize=standardize) == 0.0


def test_topk_and_test_views():
    acc = TopK(torch.device("cpu"))
    acc.add(torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]]), torch.tensor([1, 2]))
    assert (acc.top1, acc.top5, acc.count) == (50.0, 100.0, 2)
    with pytest.raises(ValueError, match="unlabelled"):
        acc.add(torch.zeros(1, 3), torch.tensor([-1]))
    clips = spread_clips(40, 8, 2, 3, "loop")  # 3 clips of span 15 spread over 40 frames: starts 0, 12, 25
    assert [int(c[0]) for c in clips] == [0, 12, 25] and all(np.diff(c).tolist() == [2] * 7 for c in clips)
    assert spread_crops(48, 64, 3) == [[0, 0, 48, 48], [0, 8, 48, 48], [0, 16, 48, 48]]


# attentive: one rank in tests/test_readme.py (toy_attentive)
@pytest.mark.parametrize("mode,extra", [
    ("linear", ["engine.precision=bf16"]),  # the head in bf16, the features from a bf16 frozen encoder
    ("finetune", ["engine.zero_stage=3", "eval.layer_decay=0.75", "model.drop_path=0.1", "data.view=finetune"]),
    ("knn", []),
])
def test_each_mode_runs_with_two_ranks_and_writes_its_results(mode, extra, pretrained, shards, val_shards, tmp_path):
    _, weights = pretrained
    train = [] if mode == "knn" else ["run.max_steps=4", "data.batch_size=2", "optim.warmup_epochs=0",
                                      "optim.warmup_steps=1", "run.log_every=2", "run.ckpt_every=0"]
    launch([mode, *overrides(*EVAL_DATA, *train, *extra, f"data.train={shards}", f"eval.val={val_shards}",
                             f"eval.weights={weights}", f"run.out_dir={tmp_path}", "run.name=ev")],
           script="tools/evaluate.py")
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["mode"] == mode and res["videos"] == 12 and res["num_classes"] == 4
    assert 0 <= res["top1"] <= res["top5"] <= 100
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "ev" / "tb"))
    acc.Reload()
    assert acc.Scalars("eval/top1")[-1].value == pytest.approx(res["top1"])
    if mode != "knn":
        assert len(acc.Scalars("loss/ce")) == 2


def test_eval_config_errors_name_the_field(pretrained, shards, capsys):
    from vssl_ds.eval.run import main

    _, weights = pretrained
    assert main(["linear", "--set", f"eval.weights={weights}", "--set", "data.size=48", "--print-config"]) == 2
    assert main(["knn", "--set", "eval.weights=/nope.safetensors", "--print-config"]) == 2
    assert main(["knn", "--set", "eval.val=/nope/manifest.json", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "set data.size=32" in err and "eval.weights: no file '/nope.safetensors'" in err
    assert "eval.val: cannot read shard manifest '/nope/manifest.json'" in err


def test_an_exported_encoder_serves_as_a_frozen_teacher(tmp_path):
    from vssl_ds.config.schema import ModelConfig
    from vssl_ds.teachers import build_teacher

    torch.manual_seed(0)
    m = ModelConfig(name="vit2d_micro_patch16", img_size=32, patch=8)
    ours = create_model(m.name, img_size=32, patch=8).eval()
    save_exported(ours, m, {}, tmp_path / "img.safetensors", {"method": "vicmae", "step": 3})
    teacher = build_teacher("vit2d_micro_patch16", str(tmp_path / "img.safetensors"), img_size=32)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(teacher(x, norm=True), ours(x)[:, 1:])  # the architecture (patch 8) came from the JSON
    with pytest.raises(ValueError, match="img_size=64 but the exported encoder was built with img_size=32"):
        build_teacher("vit2d_micro_patch16", str(tmp_path / "img.safetensors"), img_size=64)
    with pytest.raises(ValueError, match="holds a vit2d_micro_patch16"):
        build_teacher("vit2d_small_patch16", str(tmp_path / "img.safetensors"))


def test_temporal_clips_are_labelled_by_direction_only(tmp_path):
    from vssl_ds.data.synthetic import render_drift_clip, render_orbit_clip, write_synthetic_shards

    manifest = json.loads(write_synthetic_shards(tmp_path, clips=4, shards=1, frames=4, size=32,
                                                 task="orbit").read_text())
    assert manifest["classes"] == ["clockwise", "anticlockwise"]
    # the same draw with the other label runs the same path backwards: frame t of one is frame -t of the other
    a = render_orbit_clip(np.random.default_rng(3), 0, 9, 48)
    b = render_orbit_clip(np.random.default_rng(3), 1, 9, 48)
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[1], b[1])
    right = render_drift_clip(np.random.default_rng(4), 0, 9, 48)
    left = render_drift_clip(np.random.default_rng(4), 1, 9, 48)
    assert np.array_equal(right[::-1], left) and not np.array_equal(right, left)  # reversed, exactly


def test_order_sensitivity_is_zero_for_a_frame_order_blind_encoder(tmp_path):
    """The temporal benchmark's label-free measure: an image ViT pooled over frames cannot see frame order (exactly
    0: reversing the clip permutes its tokens), a video ViT with time positions can (> 0)."""
    from vssl_ds.config.schema import ModelConfig
    from vssl_ds.data.synthetic import write_synthetic_shards
    from vssl_ds.tools.temporal import order_sensitivity

    val = write_synthetic_shards(tmp_path / "val", clips=8, shards=2, frames=16, size=48, seed=3, task="drift")
    values = {}
    for name, kw in (("vit2d_micro_patch16", dict(img_size=32, patch=8)),
                     ("vit_micro_video", dict(img_size=32, patch=8, num_frames=8))):
        torch.manual_seed(0)
        m = ModelConfig(name=name, **kw)
        save_exported(create_model(name, **kw), m, {}, tmp_path / f"{name}.safetensors", {"method": "x", "step": 0})
        values[name] = order_sensitivity(str(tmp_path / f"{name}.safetensors"), str(val))
    assert values["vit2d_micro_patch16"] < 1e-9 < 1e-4 < values["vit_micro_video"]


def test_hf_export_loads_in_transformers_with_the_same_outputs(pretrained, tmp_path):
    """tools/export.py --format hf on the ZeRO-3 run: transformers.VideoMAEModel.from_pretrained loads the folder and
    its last_hidden_state is vssl_ds's encoder output on the same clip; the folder loads back as model.pretrained."""
    pytest.importorskip("transformers")
    from vssl_ds.compat import patch_torchvision

    patch_torchvision()  # transformers' VideoMAE imports torchvision (a CUDA wheel beside the CPU torch)
    from transformers import VideoMAEModel

    from vssl_ds.models.weights import load_pretrained
    from vssl_ds.tools.export import main as export

    run, weights = pretrained
    assert export([str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    ours, _ = load_exported(weights)
    theirs = VideoMAEModel.from_pretrained(str(tmp_path / "hf")).eval()
    x = torch.randn(2, 3, 8, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours.eval()(x)
        torch.testing.assert_close(theirs(pixel_values=x.permute(0, 2, 1, 3, 4)).last_hidden_state, want,
                                   atol=1e-5, rtol=1e-5)
        again = create_model("vit_micro_video", img_size=32, num_frames=8, patch=8).eval()
        assert load_pretrained(again, tmp_path / "hf").fmt == "hf_videomae"
        torch.testing.assert_close(again(x), want, atol=1e-5, rtol=1e-5)


def test_hf_pretraining_folder_continues_with_its_decoder(tmp_path):
    """A transformers VideoMAEForPreTraining folder as model.pretrained: encoder and pixel decoder load, and the MAE
    method predicts what transformers predicts for the masked tubelets."""
    pytest.importorskip("transformers")
    from vssl_ds.compat import patch_torchvision

    patch_torchvision()
    from transformers import VideoMAEConfig, VideoMAEForPreTraining

    from vssl_ds.config.loader import load_config
    from vssl_ds.methods import build_method, mask_fns

    torch.manual_seed(0)
    hf = VideoMAEForPreTraining(VideoMAEConfig(
        image_size=32, patch_size=8, num_frames=8, tubelet_size=2, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=256, layer_norm_eps=1e-6, use_mean_pooling=False,
        decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=128)).eval()
    with torch.no_grad():  # biases and norms away from their zero / one init, so a wrong mapping shows
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf.save_pretrained(str(tmp_path / "pre"))
    cfg = load_config("tiny_mae", [*TINY, f"model.pretrained={tmp_path / 'pre'}"])
    method = build_method(cfg).eval()
    fn = mask_fns(cfg)[0]
    mask = torch.from_numpy(np.stack([fn(np.random.default_rng(i)) for i in range(2)]))
    x = torch.randn(2, 3, 8, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(pixel_values=x.permute(0, 2, 1, 3, 4), bool_masked_pos=mask).logits  # [B,Nm,P*C]
        torch.testing.assert_close(method.trainable(x, mask), want, atol=1e-5, rtol=1e-5)


def test_architectures_hf_cannot_express_are_refused_by_name():
    from vssl_ds.models.hf import hf_config_for

    for name, kwargs, field in (("vit_micro_video", {"pos_embed": "sincos3d"}, "model.pos_embed"),
                                ("vit_micro_video", {"cls_token": True}, "model.cls_token"),
                                ("vit_micro_divided_st", {}, "--format vssl")):
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            hf_config_for(create_model(name, img_size=32, num_frames=8, patch=8, **kwargs))


def test_hf_classification_folder_gives_fc_norm_and_head():
    """A transformers VideoMAEForVideoClassification folder (mean pooling, no encoder norm): the encoder, fc_norm and
    the classifier load, and pooling as the official fine-tuning model gives transformers' logits."""
    pytest.importorskip("transformers")
    import tempfile

    from vssl_ds.compat import patch_torchvision

    patch_torchvision()
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    from vssl_ds.models.weights import load_pretrained

    torch.manual_seed(0)
    hf = VideoMAEForVideoClassification(VideoMAEConfig(
        image_size=32, patch_size=8, num_frames=8, tubelet_size=2, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=256, layer_norm_eps=1e-6, use_mean_pooling=True, num_labels=5)).eval()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        encoder = create_model("vit_micro_video", img_size=32, num_frames=8, patch=8).eval()
        encoder.norm = torch.nn.Identity()  # the official fine-tuning model: mean pooling into fc_norm
        ck = load_pretrained(encoder, folder, drop=("norm.",))
    fc_norm, head = torch.nn.LayerNorm(64, eps=1e-6), torch.nn.Linear(64, 5)
    fc_norm.load_state_dict(ck.parts["fc_norm"])
    head.load_state_dict(ck.parts["head"])
    x = torch.randn(2, 3, 8, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(head(fc_norm(encoder(x).mean(1))), hf(pixel_values=x.permute(0, 2, 1, 3, 4)).logits,
                                   atol=1e-4, rtol=1e-4)


def test_extract_reads_a_run_folder_like_its_export(pretrained, val_shards, tmp_path):
    """vssl-extract --weights <run folder> (its ZeRO-3 checkpoint consolidated on the fly) gives the features the
    exported encoder gives."""
    from test_extract import read_features

    from vssl_ds.tools.extract import main as extract

    run, weights = pretrained
    for name, source in (("run", run), ("export", weights)):
        assert extract([str(val_shards), str(tmp_path / name), "--weights", str(source), "--workers", "0",
                        "--stride", "2"]) == 0
    by_run, _ = read_features(tmp_path / "run")
    by_export, _ = read_features(tmp_path / "export")
    assert set(by_run) == set(by_export) and len(by_run) == 12
    for key in by_run:
        np.testing.assert_array_equal(by_run[key], by_export[key])


def test_a_test_worker_killed_on_a_video_names_it(val_shards, monkeypatch, caplog):
    """The test pass's workers: a video whose decoding kills its worker is named (key, shard, signal) in a DataError,
    not torch's bare 'worker exited unexpectedly'."""
    import vssl_ds.eval.data as eval_data
    from conftest import crash_on_first_video
    from vssl_ds.config import load_config
    from vssl_ds.data.shards import DataError
    from vssl_ds.eval.testing import view_batches

    victim_key, first = crash_on_first_video(val_shards, eval_data, monkeypatch)
    cfg = load_config("tiny_mae", [*TINY, f"data.train={val_shards}"])
    with pytest.raises((DataError, RuntimeError)) as failed:  # RuntimeError: torch's SIGCHLD handler raised here
        for _ in view_batches(str(val_shards), cfg, 1, 1, torch.device("cpu"), 2):
            pass
    told = str(failed.value) + caplog.text
    assert f"while decoding sample '{victim_key}' of {first}" in told and "re-make that shard" in told, told
    assert "killed by SIGKILL" in told
