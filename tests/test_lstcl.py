"""LSTCL under MoCo v3, BYOL and SimSiam: losses against an independent computation, the momentum target,
overfitting a fixed batch, 2-rank DeepSpeed runs (MoCo v3 gathers keys; BYOL's EMA under ZeRO-3), and a resume
that continues the momentum target bitwise."""
import pytest
import torch
import torch.nn.functional as F

from conftest import check_run, launch, overfit, overrides
from vssl_ds.config.loader import load_config
from vssl_ds.data.batch import Batch
from vssl_ds.methods import build_method

TINY = ["model.name=vit_micro_divided_st", "model.img_size=32", "model.num_frames=4", "data.size=32",
        "data.num_frames=4", "method.lstcl.proj_hidden=32", "method.lstcl.proj_dim=16", "method.lstcl.pred_hidden=32",
        "model.drop_path=0.0"]
FRAMEWORKS = ["mocov3", "byol", "simsiam"]


def _method(fw, *extra):
    torch.manual_seed(0)
    return build_method(load_config(f"lstcl_{fw}_vit_b", [*TINY, *extra]))


def _batch():
    g = torch.Generator().manual_seed(0)
    return Batch(video=torch.randn(4, 3, 4, 32, 32, generator=g), views={"long": torch.randn(4, 3, 4, 32, 32, generator=g)})


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_loss_matches_an_independent_computation(fw, symmetric):
    """symmetric=false (the default) is LSTCL's direction alone: the short clip's online prediction against the
    long clip's target; symmetric=true adds long → short."""
    method = _method(fw, f"method.lstcl.symmetric={str(symmetric).lower()}").eval()
    batch = _batch()
    short, long = batch.video, batch.views["long"]
    with torch.no_grad():
        out = method(batch)
        online = method.trainable
        p_s, p_l = online.predictor(online.embed(short)), online.predictor(online.embed(long))
        if fw == "simsiam":
            t_s, t_l = online.embed(short), online.embed(long)
        else:
            t_s, t_l = method.frozen.target(short), method.frozen.target(long)
    if fw == "mocov3":
        def ctr(q, k, tau=0.2):
            logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).t() / tau
            return 2 * tau * F.cross_entropy(logits, torch.arange(len(q)))
        expect = ctr(p_s, t_l) + (ctr(p_l, t_s) if symmetric else 0)
    elif fw == "byol":
        terms = [(2 - 2 * F.cosine_similarity(p_s, t_l)).mean(), (2 - 2 * F.cosine_similarity(p_l, t_s)).mean()]
        expect = sum(terms) / 2 if symmetric else terms[0]
    else:
        terms = [-F.cosine_similarity(p_s, t_l).mean(), -F.cosine_similarity(p_l, t_s).mean()]
        expect = sum(terms) / 2 if symmetric else terms[0]
    assert torch.allclose(out.loss, expect, atol=1e-5), (out.loss, expect)


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_heads_end_as_the_frameworks_do(fw):
    """MoCo v3: projector and predictor (_build_mlp) end in Linear without bias → BN(affine=False); SimSiam: the
    projector ends in BN(affine=False), the predictor in a Linear with bias; BYOL: both end in a Linear."""
    online = _method(fw).trainable
    proj, pred = online.embed.projector, online.predictor
    ends_in_plain_bn = lambda head: (isinstance(head[-1], torch.nn.BatchNorm1d) and not head[-1].affine  # noqa: E731
                                     and head[-2].bias is None)
    assert ends_in_plain_bn(proj) == (fw != "byol")
    assert ends_in_plain_bn(pred) == (fw == "mocov3")
    if fw != "mocov3":
        assert isinstance(pred[-1], torch.nn.Linear) and pred[-1].bias is not None


def test_momentum_target_follows_the_online_encoder():
    method = _method("byol")
    method.total_steps = 10
    online = dict(method.trainable.embed.named_parameters())
    before = {k: v.clone() for k, v in method.frozen.target.named_parameters()}
    with torch.no_grad():
        for p in method.trainable.embed.parameters():
            p.add_(1.0)
    method.after_step(0)  # m = 0.996 at step 0
    for k, v in method.frozen.target.named_parameters():
        assert torch.allclose(v, 0.996 * before[k] + 0.004 * online[k], atol=1e-6)
    assert not list(_method("simsiam").frozen.parameters())  # SimSiam: no momentum encoder


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_each_framework_fits_a_fixed_batch(fw):
    method = _method(fw).train()
    method.total_steps = 40
    first, last = overfit(method, _batch(), steps=40, lr=1e-3)
    assert last < first - 0.1, (first, last)  # stated: the loss falls by at least 0.1 in 40 steps


SWIN = ["model.name=swin3d_micro_st", "model.tubelet=2", "model.patch=4", "model.window=[2,4,4]"]


@pytest.mark.slow
# MoCo v3 on the ViT under 2 ranks: test_mocov3_keys_include_every_ranks_and_the_positive_is_offset_by_rank; BYOL's
# momentum target under ZeRO-3: test_gather_ema.py; every framework and backbone on one rank: tests/test_readme.py
@pytest.mark.parametrize("recipe,fw,stage,model", [
    ("lstcl_simsiam_vit_b", "simsiam", 2, []),
    ("lstcl_mocov3_swin_b", "mocov3", 1, SWIN)])
def test_lstcl_runs_with_two_deepspeed_ranks(shards, tmp_path, recipe, fw, stage, model):
    sets = [*TINY, *model, "data.sampling_rate=2", "data.long_stride=4", "data.batch_size=2", "data.num_workers=1",
            "optim.warmup_epochs=0", "optim.warmup_steps=2", "run.log_every=2", "run.ckpt_every=0",
            "run.max_steps=6", f"engine.zero_stage={stage}", f"data.train={shards}", f"run.out_dir={tmp_path}",
            "run.name=lstcl"]
    launch(["--config", recipe, *overrides(*sets)])
    check_run(tmp_path / "lstcl", ("train/loss", f"loss/{fw}"), points=3)


def _infonce_rank(rank, world, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        method = _method("mocov3")
        seen = {}
        real = F.cross_entropy

        def spy(logits, labels, *a, **k):
            seen["width"], seen["labels"] = logits.shape[1], labels.tolist()
            return real(logits, labels, *a, **k)

        g = torch.Generator().manual_seed(rank)
        q, k = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
        F.cross_entropy = spy
        try:
            loss = method.infonce(q, k)
        finally:
            F.cross_entropy = real
        out[rank] = (seen["width"], seen["labels"], float(loss))
    finally:
        dist.destroy_process_group()


def test_mocov3_keys_include_every_ranks_and_the_positive_is_offset_by_rank():
    """MoCo v3 under 2 ranks: each rank's logits span the keys of both ranks (width 2B) and the positive of
    local sample i is global key rank·B + i."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_infonce_rank, args=(2, port, out), nprocs=2, join=True)
    assert out[0][:2] == (6, [0, 1, 2]) and out[1][:2] == (6, [3, 4, 5])
    qk = [[torch.randn(3, 16, generator=g) for _ in range(2)] for g in (torch.Generator().manual_seed(r) for r in range(2))]
    keys = F.normalize(torch.cat([k for _, k in qk]), dim=-1)
    for r, (q, _) in enumerate(qk):  # 2τ·CE over all ranks' keys, computed here from the same draws
        expect = 2 * 0.2 * F.cross_entropy(F.normalize(q, dim=-1) @ keys.t() / 0.2, torch.arange(3) + 3 * r)
        assert abs(out[r][2] - float(expect)) < 1e-5


@pytest.mark.slow
def test_a_resumed_byol_run_continues_its_momentum_target_bitwise(shards, tmp_path):
    """The EMA target lives outside the engine: a run stopped at step 3 and resumed ends with the same weights as
    one that ran straight (before the target was checkpointed, a resumed run restarted it from the initial
    weights)."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    def run(name, *extra, resume=False):
        sets = [*TINY, "data.sampling_rate=2", "data.long_stride=4", "data.batch_size=2", "data.num_workers=1",
                "optim.warmup_epochs=0", "optim.warmup_steps=2", "run.log_every=1", "run.ckpt_every=0",
                "run.max_steps=6", "engine.zero_stage=1", f"data.train={shards}", f"run.out_dir={tmp_path}",
                f"run.name={name}", *extra]
        cmd = [sys.executable, str(ROOT / "pretrain.py"), *(["--auto-resume"] if resume else []),
               "--config", "lstcl_byol_vit_b", *overrides(*sets)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stderr[-3000:]

    run("straight")
    run("split", "run.stop_at=3")
    run("split", resume=True)
    want = torch.load(tmp_path / "straight" / "final_model.pt")
    got = torch.load(tmp_path / "split" / "final_model.pt")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
