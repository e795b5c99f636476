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
- monitor/cos_mean: mean cosine similarity between different clips (towards 1: collapse),
- for the methods that train on two clips of a video (LSTCL, ViC-MAE, iBoot: `Method.probe_pair` names the other
  clip), monitor/alignment and monitor/uniformity of the two clips' features (Wang & Isola 2020, on the
  L2-normalised pooled features: alignment = E||u - v||^2 over positive pairs, towards 0 when the views agree;
  uniformity = log E exp(-2||u_i - u_j||^2) over different clips, averaged over both views, towards 0 when every
  clip maps to one point, about -4 for features spread over a high-dimensional sphere).

With `monitor.val` (labelled shards), also `monitor/knn_top1`: leave-one-out weighted kNN accuracy (DINO's vote,
monitor.knn_k neighbours, eval.knn_t; eval/knn.py::leave_one_out_top1) of the frozen pooled features of those clips,
each dimension standardised over the clips first (monitor.knn_standardize, as MAE's linear probe does with a
non-affine BatchNorm), every rank extracting its share; probed once before the first step too, so the curve starts
at the random initialisation.

Images of the first `monitor.images` probe clips under a fixed mask per clip, a few time steps each (whatever the
method's `probe_images` returns): for the masked-pixel methods (VideoMAE, ViC-MAE) `monitor/reconstruction`, one
row each of original frames, masked input and reconstruction; for MVD `monitor/token_error`, the per-token
regression error of each teacher's target as a heat map over the masked tokens; for BEVT `monitor/token_accuracy`,
the masked cells whose tokenizer id the model predicts (green) or misses (red).

A collapse alarm (a warning and a TensorBoard text entry) fires when the effective rank or the feature std falls
below `monitor.collapse_drop` x the highest value this run has reached. Relative, because absolute levels say little:
a randomly initialised ViT's mean-pooled features are nearly identical for every clip (cosine ~1, RankMe ~1), and a
masked-modelling run climbs from there; what must never happen is a fall back after learning.
"""
from __future__ import annotations

import logging
import math
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


def alignment_uniformity(first: torch.Tensor, second: torch.Tensor) -> dict[str, float]:
    """Pooled features of two clips of the same videos [N,D] each → Wang & Isola's alignment (alpha 2) and
    uniformity (t 2, the mean of both views'), on L2-normalised features (float64)."""
    u = torch.nn.functional.normalize(first.double(), dim=1)
    v = torch.nn.functional.normalize(second.double(), dim=1)

    def uniformity(z):
        d2 = torch.pdist(z).pow(2)
        return float(torch.logsumexp(-2 * d2, 0) - math.log(len(d2))) if len(d2) else float("nan")

    return {"alignment": float((u - v).pow(2).sum(1).mean()), "uniformity": (uniformity(u) + uniformity(v)) / 2}


def heat_rows(pixels: torch.Tensor, heat: torch.Tensor, hidden: torch.Tensor, grid: tuple[int, int, int],
              colors: torch.Tensor | None = None) -> torch.Tensor:
    """A per-token map painted over its clip: pixels [B,C,T,H,W] in [0,1], heat [B,N] in [0,1] (token order t,h,w),
    hidden [B,N] bool (painted tokens; the others show the clip dimmed); `colors` [B,N,3] paints a colour per token
    instead of the heat scale (black → red → yellow → white).  # [B,C,T,H,W]"""
    pixels, heat, hidden = pixels.float().cpu(), heat.float().cpu(), hidden.cpu()
    b, c, t, h, w = pixels.shape
    gt, gh, gw = grid
    if colors is None:
        x = heat.clamp(0, 1)[..., None]
        colors = torch.cat([(3 * x).clamp(0, 1), (3 * x - 1).clamp(0, 1), (3 * x - 2).clamp(0, 1)], -1)  # [B,N,3]

    def up(z):  # [B,N,k] → [B,k,T,H,W]
        z = z.reshape(b, gt, gh, gw, -1).permute(0, 4, 1, 2, 3)
        return z.repeat_interleave(t // gt, 2).repeat_interleave(h // gh, 3).repeat_interleave(w // gw, 4)

    grey = pixels.mean(1, keepdim=True).expand_as(pixels)
    painted = 0.35 * grey + 0.65 * up(colors.float().cpu())
    return torch.where(up(hidden[..., None].float()) > 0.5, painted, 0.5 * pixels)


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
        self.knn_classes = 0  # classes in monitor.val (chance = 100 / classes)
        m = cfg.monitor
        self.every, self.drop = m.every, m.collapse_drop
        self.best = {"rankme": 0.0, "feat_std_mean": 0.0}
        self.want = -(-m.clips // dist.world()) if m.every else 0  # clips this rank contributes
        self.encoder, self.device, self.scalars, self._pooled = encoder, device, scalars, pooled
        self.mean, self.std = cfg.data.mean, cfg.data.std
        self.path = run_dir / "monitor" / f"probe_rank{dist.rank()}.pt"
        self.pair = getattr(method, "probe_pair", None)  # the other clip's name in Batch.views (two-clip methods)
        self.probe: torch.Tensor | None = None  # [n,C,T,H,W] uint8
        self.probe_pair: torch.Tensor | None = None  # [n,C,T',H',W'] uint8, the other clip of the same videos
        self.probe_targets: dict[str, torch.Tensor] = {}  # cached targets of the first `images` probe clips
        self.alarmed = False
        if self.want and self.path.is_file():
            kept = torch.load(self.path, weights_only=True)
            kept = kept if isinstance(kept, dict) else {"video": kept}
            self.probe, self.probe_pair = kept["video"], kept.get("pair")
            self.probe_targets = kept.get("targets", {})

    def collect(self, video: torch.Tensor | None, views: dict | None = None, targets: dict | None = None) -> None:
        """Keep the first training clips (host uint8, before normalisation) until this rank has its share, with
        the other clip of each video (two-clip methods) and the cached targets of the first `monitor.images`."""
        if not self.want or video is None or (self.probe is not None and len(self.probe) >= self.want):
            return
        have = 0 if self.probe is None else len(self.probe)
        take = slice(0, self.want - have)
        cat = lambda old, new: new.cpu().clone() if old is None else torch.cat([old, new.cpu()])  # noqa: E731
        self.probe = cat(self.probe, video[take])
        if self.pair and views and self.pair in views:
            self.probe_pair = cat(self.probe_pair, views[self.pair][take])
        if targets and have < self.images:
            part = slice(0, self.images - have)
            self.probe_targets = {k: cat(self.probe_targets.get(k), v[part]) for k, v in targets.items()
                                  if not k.startswith("image_")}  # the video's own targets (not the image stream's)
        if len(self.probe) >= self.want:
            tmp = self.path.with_suffix(".tmp")
            kept = {"video": self.probe, "targets": self.probe_targets}
            if self.probe_pair is not None:
                kept["pair"] = self.probe_pair
            try:  # never a reason to stop training (a full disk is the checkpoint's to report)
                self.path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(kept, tmp)
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
        pair = self.probe_pair if self.pair else None
        if pair is not None and len(pair) != len(probe):
            pair = None  # (a probe file from before the pair was kept)
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            self.encoder.eval()
            try:
                self.beat()
                mine = self._features(probe, normalize)
                mine_pair = self._features(pair, normalize) if self.pair else None
            finally:
                self.encoder.train(was_training)
        images = self._images(probe, devices)
        everyone = [f for f in dist.all_gather_object((mine, mine_pair)) if len(f[0])]
        knn = self.knn(step, log_it=False)
        if dist.rank() != 0 or not everyone:
            return {}
        stats = health(torch.cat([f for f, _ in everyone]))
        pairs = [(f, g) for f, g in everyone if g is not None and len(g) == len(f)]
        if self.pair and pairs:
            stats.update(alignment_uniformity(torch.cat([f for f, _ in pairs]), torch.cat([g for _, g in pairs])))
        if knn is not None:
            stats["knn_top1"] = knn
        stats["seconds"] = time.perf_counter() - t0
        self.scalars.add({f"monitor/{k}": v for k, v in stats.items()}, step)
        if images is not None:
            self.scalars.image(f"monitor/{images[0]}", images[1], step)
        self._alarm(stats, step)
        return stats

    def _features(self, clips: torch.Tensor | None, normalize) -> torch.Tensor:
        """Pooled features of uint8 clips [n,C,T,H,W], 8 at a time (at least one forward: ZeRO-3 ranks keep
        step).  # [n,D] on the host"""
        clips = clips if clips is not None else torch.zeros(0, dtype=torch.uint8)
        feats = []
        for chunk in clips.split(8) if len(clips) else [clips]:
            feats.append(self._pooled(self.encoder, normalize(chunk.to(self.device), self.mean, self.std), "mean")
                         .float() if len(chunk) else torch.zeros(0, 1, device=self.device))
        return torch.cat(feats).cpu()

    def knn(self, step: int, log_it: bool = True) -> float | None:
        """Leave-one-out weighted kNN top-1 (%) on monitor.val with the current encoder; every rank calls this."""
        if not self.val:
            return None
        from .eval.knn import leave_one_out_top1
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
                        feats.append(f.cpu())
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
        m = self.cfg.monitor
        top1 = leave_one_out_top1(bank, y, m.knn_k, e.knn_t, m.knn_standardize)
        self.knn_classes = int(len(y.unique()))
        self.knn_history.append((step, top1))
        if log_it:
            self.scalars.add({"monitor/knn_top1": top1}, step)
        return top1

    def _images(self, probe: torch.Tensor, devices) -> tuple[str, torch.Tensor] | None:
        """Every rank (ZeRO-3 forwards are collective) → rank 0's (tag, image grid [3,H,W] in [0,1]), or None."""
        import numpy as np

        from .data.transforms import normalize

        k = min(self.images, len(probe))
        if not k or self.mask_fn is None or self.method is None or (dist.rank() != 0 and not self.lockstep):
            return None  # only rank 0 draws (under ZeRO-3 every rank joins its forwards)
        probe_images = getattr(self.method, "probe_images", None)
        if probe_images is None:
            return None
        masks = torch.from_numpy(np.stack([self.mask_fn(np.random.default_rng([self.seed, 7, i])) for i in range(k)]))
        from .data.targets import widen_targets

        targets = widen_targets({n: t[:k].to(self.device) for n, t in self.probe_targets.items()})
        if targets and any(len(t) < k for t in targets.values()):
            return None  # (cached targets missing for some clips: a probe file from an older run)
        trainable = self.method.trainable
        was_training = trainable.training
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            trainable.eval()
            try:
                x = normalize(probe[:k].to(self.device), self.mean, self.std)
                out = probe_images(x, masks.to(self.device), targets)
            finally:
                trainable.train(was_training)
        if dist.rank() != 0 or out is None:
            return None
        return out[0], contact_sheet(out[1])

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
