"""Label-free health of the encoder during pretraining: is it learning, or collapsing?

Every `monitor.every` optimizer steps, the encoder (as the engine holds it: ZeRO-3 parameters are gathered by the
forward itself) encodes a fixed probe set without masking, in eval mode, under no_grad and with the RNG states
saved and restored, so the run's weights are bitwise those of a run without the monitor. The probe set is the first
`monitor.clips / ranks` clips each rank trains on (no extra data read), kept in `<run>/monitor/probe_rank<r>.pt` so
a resumed run probes the same clips. Pooled features of all ranks are gathered; rank 0 writes to TensorBoard:

- monitor/feat_std_mean, monitor/feat_std_min: per-dimension std of the L2-normalised features x sqrt(D) (about 1
  when the features spread over the sphere; towards 0 when every clip maps to the same point: collapse),
- monitor/rankme: effective rank of the features (RankMe: exp of the entropy of the normalised singular values),
  and monitor/rankme_frac = rankme / min(clips, D),
- monitor/cos_mean: mean cosine similarity between different clips (towards 1: collapse).

With `monitor.val` (labelled shards), also `monitor/knn_top1`: leave-one-out weighted kNN accuracy (DINO's vote,
eval.knn_k / eval.knn_t) of the frozen pooled features of those clips, every rank extracting its share; probed once
before the first step too, so the curve starts at the random initialisation.

For masked-pixel methods (VideoMAE) `monitor/reconstruction` is an image grid of the first `monitor.images` probe
clips, one row each of original frames, masked input and reconstruction (a fixed mask per clip), over a few time
steps.

A collapse alarm (a warning and a TensorBoard text entry) fires when the effective rank or the feature std falls
below `monitor.collapse_drop` x the highest value this run has reached. Relative, because absolute levels say little:
a randomly initialised ViT's mean-pooled features are nearly identical for every clip (cosine ~1, RankMe ~1), and a
masked-modelling run climbs from there; what must never happen is a fall back after learning.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
import torch.nn as nn

from .engine import dist

log = logging.getLogger(__name__)


def health(features: torch.Tensor) -> dict[str, float]:
    """features [N,D] → the label-free statistics above (float64 maths)."""
    f = features.double()
    n, d = f.shape
    unit = torch.nn.functional.normalize(f, dim=1)
    std = unit.std(dim=0, unbiased=True) * d ** 0.5
    sigma = torch.linalg.svdvals(f)
    p = sigma / sigma.sum().clamp_min(1e-12) + 1e-12
    rankme = float(torch.exp(-(p * p.log()).sum()))
    cos = unit @ unit.T
    off = (cos.sum() - cos.diagonal().sum()) / max(n * (n - 1), 1)
    return {"feat_std_mean": float(std.mean()), "feat_std_min": float(std.min()), "rankme": rankme,
            "rankme_frac": rankme / min(n, d), "cos_mean": float(off)}


def contact_sheet(rows: dict[str, torch.Tensor], frames: int = 4, gap: int = 2) -> torch.Tensor:
    """{name: [B,C,T,H,W] in [0,1]} → one image [C, B*len(rows)*(H+gap), frames*(W+gap)]: for every clip a row
    per entry (in order), `frames` time steps spread over the clip."""
    first = next(iter(rows.values()))
    b, c, t, h, w = first.shape
    picks = torch.linspace(0, t - 1, min(frames, t)).round().long()
    sheet = torch.ones(c, b * len(rows) * (h + gap), len(picks) * (w + gap))
    for i in range(b):
        for j, video in enumerate(rows.values()):
            top = (i * len(rows) + j) * (h + gap)
            for col, f in enumerate(picks):
                sheet[:, top:top + h, col * (w + gap):col * (w + gap) + w] = video[i, :, f].float().cpu()
    return sheet


class HealthMonitor:
    def __init__(self, cfg, encoder: nn.Module, device: torch.device, run_dir: Path, scalars, method=None,
                 mask_fn=None, beat=lambda: None):
        from .eval.classifier import pooled

        self.method, self.mask_fn, self.images = method, mask_fn, cfg.monitor.images
        self.seed, self.cfg, self.val = cfg.run.seed, cfg, cfg.monitor.val
        self.beat = beat  # progress for the hang watchdog (a large monitor.val takes a while)
        self.lockstep = cfg.engine.zero_stage == 3  # every forward is collective: ranks out of clips keep stepping
        self.knn_history: list[tuple[int, float]] = []
        m = cfg.monitor
        self.every, self.drop = m.every, m.collapse_drop
        self.best = {"rankme": 0.0, "feat_std_mean": 0.0}
        self.want = -(-m.clips // dist.world()) if m.every else 0  # clips this rank contributes
        self.encoder, self.device, self.scalars, self._pooled = encoder, device, scalars, pooled
        self.mean, self.std = cfg.data.mean, cfg.data.std
        self.path = run_dir / "monitor" / f"probe_rank{dist.rank()}.pt"
        self.probe: torch.Tensor | None = None  # [n,C,T,H,W] uint8
        self.alarmed = False
        if self.want and self.path.is_file():
            self.probe = torch.load(self.path, weights_only=True)

    def collect(self, video: torch.Tensor | None) -> None:
        """Keep the first training clips (host uint8, before normalisation) until this rank has its share."""
        if not self.want or video is None or (self.probe is not None and len(self.probe) >= self.want):
            return
        take = video[: self.want - (0 if self.probe is None else len(self.probe))].clone()
        self.probe = take if self.probe is None else torch.cat([self.probe, take])
        if len(self.probe) >= self.want:
            tmp = self.path.with_suffix(".tmp")
            try:  # never a reason to stop training (a full disk is the checkpoint's to report)
                self.path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(self.probe, tmp)
                os.replace(tmp, self.path)
            except (OSError, RuntimeError) as e:
                tmp.unlink(missing_ok=True)
                log.warning("could not keep the monitor's probe clips in %s (%s): a resumed run will probe other "
                            "clips", self.path, e)

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def run(self, step: int) -> dict[str, float]:
        """Every rank calls this at the same step (ZeRO-3 forwards and the gather are collectives)."""
        from .data.transforms import normalize

        t0 = time.perf_counter()
        devices = [self.device] if self.device.type == "cuda" else []
        was_training = self.encoder.training
        probe = self.probe if self.probe is not None else torch.zeros(0, dtype=torch.uint8)
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            self.encoder.eval()
            try:
                feats = []
                self.beat()
                for chunk in probe.split(8) if len(probe) else [probe]:
                    x = normalize(chunk.to(self.device), self.mean, self.std)
                    feats.append(self._pooled(self.encoder, x, "mean").float() if len(chunk) else
                                 torch.zeros(0, 1, device=self.device))
            finally:
                self.encoder.train(was_training)
        mine = torch.cat(feats).cpu()
        grid = self._reconstructions(probe, devices)
        everyone = [f for f in dist.all_gather_object(mine) if len(f)]
        knn = self.knn(step, log_it=False)
        if dist.rank() != 0 or not everyone:
            return {}
        stats = health(torch.cat(everyone))
        if knn is not None:
            stats["knn_top1"] = knn
        stats["seconds"] = time.perf_counter() - t0
        self.scalars.add({f"monitor/{k}": v for k, v in stats.items()}, step)
        if grid is not None:
            self.scalars.image("monitor/reconstruction", grid, step)
        self._alarm(stats, step)
        return stats

    def knn(self, step: int, log_it: bool = True) -> float | None:
        """Leave-one-out weighted kNN top-1 (%) on monitor.val with the current encoder; every rank calls this."""
        if not self.val:
            return None
        import torch.nn.functional as F

        from .eval.testing import view_batches

        e = self.cfg.eval
        devices = [self.device] if self.device.type == "cuda" else []
        was_training = self.encoder.training
        feats, labels = [], []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            self.encoder.eval()
            try:
                for video, label, b, _ in view_batches(self.val, self.cfg, 1, 1, self.device, 16, self.lockstep):
                    self.beat()
                    f = self._pooled(self.encoder, video, "mean").float()
                    if label is not None:
                        feats.append(F.normalize(f, dim=-1).cpu())
                        labels.append(label)
            finally:
                self.encoder.train(was_training)
        mine = (torch.cat(feats), torch.cat(labels)) if feats else None
        parts = [p for p in dist.all_gather_object(mine) if p is not None]
        if dist.rank() != 0:
            return None
        if not parts:
            log.warning("monitor.val=%s gave no clips: no kNN probe", self.val)
            return None
        bank, y = torch.cat([f for f, _ in parts]), torch.cat([lab for _, lab in parts])
        if len(bank) < 2 or int(y.min()) < 0:
            log.warning("monitor.val needs at least 2 labelled clips (got %d, labels from %d): no kNN probe",
                        len(bank), int(y.min()) if len(y) else -1)
            return None
        sim = bank @ bank.T
        sim.fill_diagonal_(float("-inf"))  # leave one out: a clip never votes for itself
        top, idx = sim.topk(min(e.knn_k, len(bank) - 1), dim=1)
        votes = torch.zeros(len(bank), int(y.max()) + 1).scatter_add_(1, y[idx], (top / e.knn_t).exp())
        top1 = 100.0 * float((votes.argmax(1) == y).float().mean())
        self.knn_history.append((step, top1))
        if log_it:
            self.scalars.add({"monitor/knn_top1": top1}, step)
        return top1

    def _reconstructions(self, probe: torch.Tensor, devices) -> torch.Tensor | None:
        """Every rank (ZeRO-3 forwards are collective) → rank 0's image grid [3,H,W] in [0,1], or None."""
        import numpy as np

        from .data.transforms import normalize

        k = min(self.images, len(probe))
        if not k or self.mask_fn is None or not hasattr(self.method, "reconstruct"):
            return None
        masks = torch.from_numpy(np.stack([self.mask_fn(np.random.default_rng([self.seed, 7, i])) for i in range(k)]))
        trainable = self.method.trainable
        was_training = trainable.training
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            trainable.eval()
            try:
                x = normalize(probe[:k].to(self.device), self.mean, self.std)
                out = self.method.reconstruct(x, masks.to(self.device))
            finally:
                trainable.train(was_training)
        if dist.rank() != 0:
            return None
        return contact_sheet(out)

    def _alarm(self, stats: dict[str, float], step: int) -> None:
        fallen = [k for k in self.best if self.best[k] > 0 and stats[k] < self.drop * self.best[k]]
        for k in self.best:
            self.best[k] = max(self.best[k], stats[k])
        if not fallen:
            self.alarmed = False
            return
        if self.alarmed:
            return
        self.alarmed = True
        names = {"rankme": "effective rank (RankMe)", "feat_std_mean": "feature std"}
        what = " and ".join(f"{names[k]} {stats[k]:.3g}, below {self.drop:g} x its best {self.best[k]:.3g}"
                            for k in fallen)
        text = (f"possible representation collapse at step {step}: {what} (monitor.collapse_drop={self.drop:g}). "
                "Check the learning rate and warm-up, the EMA momentum / predictor (BYOL, SimSiam), the temperature "
                "(MoCo v3, ViC-MAE), weight decay, and that the views differ; keep the checkpoint from before the fall")
        log.warning("%s", text)
        self.scalars.text("monitor/alarm", text, step)
