"""LSTCL — long-short temporal contrastive learning (Wang et al., CVPR 2022): the online encoder sees a short
clip and predicts the target's embedding of a long clip of the same video (same frame count, larger stride),
under MoCo v3 (InfoNCE against keys from every rank, momentum encoder), BYOL (2−2cos, EMA target) or SimSiam
(−cos with stop-gradient, no EMA). No public code: see LSTCLConfig for which defaults are reconstructed."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config.schema import Config
from ..data.batch import Batch
from ..engine.dist import all_gather_nograd
from ..models import build_encoder
from ..models.heads import mlp_head
from .base import Method, StepOutput
from .ema import EMA


class Embed(nn.Module):
    """Backbone → one vector per clip: the CLS token (divided ViT) or the mean over space-time (Swin)."""

    def __init__(self, backbone: nn.Module, projector: nn.Module):
        super().__init__()
        self.backbone, self.projector = backbone, projector

    def forward(self, video):
        x = self.backbone(video)
        x = x.flatten(2).mean(-1) if x.dim() == 5 else x[:, 0]  # Swin [B,C,T,H,W] | ViT [B,1+N,D]
        return self.projector(x)


class LSTCLOnline(nn.Module):
    def __init__(self, embed: Embed, predictor: nn.Module):
        super().__init__()
        self.embed, self.predictor = embed, predictor

    def forward(self, short, long):
        """→ predictions of both clips [2B,P] and their projections [2B,P] (SimSiam's targets). Each clip
        length goes through on its own, so BatchNorm statistics are per view (as in MoCo v3 / BYOL)."""
        z = torch.cat([self.embed(short), self.embed(long)])
        p = torch.cat([self.predictor(z[:short.shape[0]]), self.predictor(z[short.shape[0]:])])
        return p, z


class LSTCL(Method):
    probe_pair = "long"  # the monitor's alignment / uniformity: the short clip's features against the long one's
    def __init__(self, cfg: Config):
        c = cfg.method.lstcl
        backbone = build_encoder(cfg.model)
        width = getattr(backbone, "num_features", None) or backbone.embed_dim
        last_bn = c.framework != "byol"  # BYOL's projector ends in a plain Linear
        # MoCo v3 and SimSiam end their projector in BatchNorm without affine parameters; MoCo v3's predictor is
        # _build_mlp(2, …) with the same ending (Linear without bias → BN(affine=False)); BYOL's and SimSiam's end in
        # a plain Linear.
        embed = Embed(backbone, mlp_head(width, c.proj_hidden, c.proj_dim, c.proj_layers, last_bn, last_affine=False))
        predictor = mlp_head(c.proj_dim, c.pred_hidden, c.proj_dim, 2, last_bn=c.framework == "mocov3",
                             last_affine=False)
        online = LSTCLOnline(embed, predictor)
        if torch.cuda.is_available():  # MoCo v3 / BYOL normalise over the global batch (CPU: per rank)
            online = nn.SyncBatchNorm.convert_sync_batchnorm(online)
        target = EMA(embed) if c.framework in ("mocov3", "byol") else None
        super().__init__(online, target)
        self.cfg, self.total_steps = c, 0

    def _targets(self, short, long, z):
        if self.frozen is None or not isinstance(self.frozen, EMA):  # SimSiam: the online projection, stopped
            return z.detach()
        with torch.no_grad():
            return torch.cat([self.frozen(short), self.frozen(long)]).float()

    def forward(self, batch: Batch) -> StepOutput:
        c, short, long = self.cfg, batch.video, batch.views["long"]
        b = short.shape[0]
        p, z = self.student(short, long)  # [2B,P]: rows 0..B-1 from the short clips, B..2B-1 from the long
        t = self._targets(short, long, z)
        pairs = [(p[:b], t[b:])]  # short → long: the LSTCL direction
        if c.symmetric:
            pairs.append((p[b:], t[:b]))
        if c.framework == "mocov3":
            losses = [self.infonce(q, k) for q, k in pairs]
        elif c.framework == "byol":
            losses = [(2 - 2 * F.cosine_similarity(q.float(), k, dim=-1)).mean() for q, k in pairs]
        else:
            losses = [-F.cosine_similarity(q.float(), k, dim=-1).mean() for q, k in pairs]
        loss = sum(losses) / (1 if c.framework == "mocov3" else len(losses))  # MoCo v3 sums its two terms
        return StepOutput(loss, {f"loss/{c.framework}": loss.detach()})

    def infonce(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """MoCo v3: 2τ · CE(q·kᵀ/τ), keys from every rank, the positive is this sample's own key."""
        tau = self.cfg.temperature
        q, k = F.normalize(q.float(), dim=-1), F.normalize(k, dim=-1)
        keys = all_gather_nograd(k)  # [world*B,P]
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
        return 2 * tau * F.cross_entropy(q @ keys.t() / tau, labels)

    def train(self, mode: bool = True):
        super().train(mode)
        if isinstance(self.frozen, EMA):  # the momentum encoder normalises with batch statistics, like MoCo v3's
            self.frozen.target.train(mode)
        return self

    def after_step(self, step: int) -> None:
        if isinstance(self.frozen, EMA):  # m: base → 1 along a half cosine over the run
            base, total = self.cfg.momentum, max(self.total_steps, 1)
            m = 1 - (1 - base) * (math.cos(math.pi * min(step, total) / total) + 1) / 2
            self.frozen.update(self.trainable.embed, m)


