"""Weighted kNN on frozen features (DINO's protocol): L2-normalised pooled features, the k most similar
training videos vote with weight exp(cos / T). Training features are written to the run folder per rank, so a
rerun with --auto-resume (or another k / T) skips their extraction."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config.schema import Config
from ..engine import dist
from .classifier import build_eval_encoder, num_classes_of, pooled
from .metrics import TopK
from .testing import view_batches

log = logging.getLogger(__name__)


@torch.no_grad()
def extract(encoder, spec: str, cfg: Config, clips: int, crops: int, device, what: str):
    """This rank's share of `spec` → (features [n,D] fp16 L2-normalised, labels [n])."""
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    feats, labels = [], []
    for video, label, b, _ in view_batches(spec, cfg, clips, crops, device, cfg.eval.test_batch_size,
                                           progress=f"{what} features"):
        with autocast:
            f = pooled(encoder, video, cfg.eval.pool).float()  # [B*V,D]
        feats.append(F.normalize(f.view(b, -1, f.shape[-1]).mean(1), dim=-1).half().cpu())
        labels.append(label)
    if not feats:
        return torch.zeros(0, 0, dtype=torch.float16), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def _fingerprint(cfg: Config) -> str:
    e, d = cfg.eval, cfg.data
    w = Path(e.weights)
    key = {"weights": str(w.resolve()) if e.weights else f"random:{cfg.model.name}:{cfg.run.seed}",
           "mtime": w.stat().st_mtime_ns if e.weights else 0, "train": d.train, "views": e.knn_train_views,
           "size": d.size, "frames": d.num_frames, "stride": d.sampling_rate, "pool": e.pool, "world": dist.world()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def train_bank(encoder, cfg: Config, device, run_dir: Path):
    """This rank's training features, from the run folder when a previous run of the same setup wrote them."""
    path = run_dir / "features" / f"train-rank{dist.rank()}.pt"
    fp = _fingerprint(cfg)
    if cfg.run.auto_resume and path.is_file():
        saved = torch.load(path, map_location="cpu")
        if saved.get("fingerprint") == fp:
            log.info("training features from %s", path)
            return saved["features"], saved["labels"]
        log.info("%s was written for another encoder or data: extracting again", path)
    feats, labels = extract(encoder, cfg.data.train, cfg, cfg.eval.knn_train_views, 1, device, "train")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"fingerprint": fp, "features": feats, "labels": labels}, tmp)
    tmp.replace(path)
    return feats, labels


def vote(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int, k: int,
         t: float, chunk: int = 1024, leave_one_out: bool = False) -> torch.Tensor:
    """query [n,D], bank [N,D] (both L2-normalised) → class scores [n,K]. `leave_one_out`: the query is the bank,
    and no row votes for itself."""
    k = min(k, bank.shape[0] - int(leave_one_out))
    out = []
    for start, q in zip(range(0, query.shape[0], chunk), query.split(chunk)):
        sim = q.float() @ bank.float().T
        if leave_one_out:
            rows = torch.arange(q.shape[0])
            sim[rows, rows + start] = float("-inf")
        sim, idx = sim.topk(k, dim=1)  # [c,k]
        votes = torch.zeros(q.shape[0], num_classes)
        out.append(votes.scatter_add_(1, bank_labels[idx], (sim / t).exp()))
    return torch.cat(out) if out else torch.zeros(0, num_classes)


def leave_one_out_top1(features: torch.Tensor, labels: torch.Tensor, k: int, t: float,
                       standardize: bool = True) -> float:
    """Top-1 (%) of the weighted kNN vote of every clip among the others (the health monitor's labelled probe).
    features [N,D] as pooled (not normalised). `standardize`: each dimension is centred and scaled to unit std over
    the clips before the L2 normalisation, as MAE's linear probe puts a non-affine BatchNorm before its classifier:
    masked-modelling features carry a few dimensions of large mean and scale that otherwise decide every cosine."""
    f = features.float()
    if standardize:
        f = (f - f.mean(0)) / f.std(0).clamp_min(1e-6)
    f = F.normalize(f, dim=-1)
    scores = vote(f, f, labels, int(labels.max()) + 1, k, t, leave_one_out=True)
    return 100.0 * float((scores.argmax(1) == labels).float().mean())


def knn_classify(cfg: Config, device, run_dir: Path) -> tuple[TopK, int]:
    e = cfg.eval
    if not e.val:
        raise ValueError("kNN needs eval.val (labelled test shards) besides data.train (the labelled training set)")
    num_classes = num_classes_of(cfg)
    encoder = build_eval_encoder(cfg)[0].to(device).eval()
    feats, labels = train_bank(encoder, cfg, device, run_dir)
    parts = dist.all_gather_object((feats, labels))
    bank = torch.cat([f for f, _ in parts if len(f)])
    bank_labels = torch.cat([lab for _, lab in parts if len(lab)])
    if len(bank) == 0:
        raise RuntimeError(f"no training features: data.train={cfg.data.train!r} yielded no readable video")
    if int(bank_labels.min()) < 0 or int(bank_labels.max()) >= num_classes:
        raise ValueError(f"training labels span {int(bank_labels.min())}..{int(bank_labels.max())}, outside "
                         f"0..{num_classes - 1}: kNN needs labelled shards (and eval.num_classes to cover them)")
    log.info("kNN bank: %d training videos x %d dims, k=%d, T=%g", len(bank), bank.shape[1], e.knn_k, e.knn_t)
    query, query_labels = extract(encoder, e.val, cfg, e.test_clips, e.test_crops, device, "test")
    scores = TopK(device)  # counts kept on the backend's device for the all-reduce; the votes stay on CPU
    if len(query):
        scores.add(vote(query, bank, bank_labels, num_classes, e.knn_k, e.knn_t), query_labels)
    scores.reduce()
    log.info("kNN: %d test videos: top-1 %.2f %%, top-5 %.2f %%", scores.count, scores.top1, scores.top5)
    return scores, num_classes
