"""iBoot — a video encoder that subsumes a strong frozen image model: BYOL-style without EMA. The online branch
is video encoder → projector → predictor → linear map to the teacher's width; the target is the frozen image
model's global embedding of the frames of another clip of the same video, averaged over frames; loss 2−2cos.
No public code: defaults are reconstructed (see IBootConfig)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..config.schema import Config
from ..data.batch import Batch
from ..models import build_encoder
from ..models.heads import mlp_head
from ..teachers import build_teacher
from .base import Method, StepOutput
from .lstcl import Embed


class IBootOnline(nn.Module):
    def __init__(self, embed: Embed, predictor: nn.Module, to_teacher: nn.Module):
        super().__init__()
        self.embed, self.predictor, self.to_teacher = embed, predictor, to_teacher

    def forward(self, clip):  # [B,C,T,H,W] → [B,Dteacher]
        return self.to_teacher(self.predictor(self.embed(clip)))


class IBoot(Method):
    def __init__(self, cfg: Config):
        c, m = cfg.method.iboot, cfg.model
        extra = {} if c.teacher.startswith("timm:") else {"img_size": m.img_size}
        teacher = build_teacher(c.teacher, c.teacher_weights, **extra)
        backbone = build_encoder(m)
        width = getattr(backbone, "num_features", None) or backbone.embed_dim
        online = IBootOnline(Embed(backbone, mlp_head(width, c.proj_hidden, c.proj_dim, 2, last_bn=False)),
                             mlp_head(c.proj_dim, c.pred_hidden, c.proj_dim, 2, last_bn=False),
                             nn.Linear(c.proj_dim, teacher.embed_dim))
        super().__init__(online, teacher)
        self.cfg = c

    @torch.no_grad()
    def teacher_embedding(self, clip: torch.Tensor) -> torch.Tensor:
        """The frozen image model's global embedding of every frame, averaged over frames.  # [B,D]"""
        b, t = clip.shape[0], clip.shape[2]
        tokens = self.frozen(rearrange(clip, "b c t h w -> (b t) c h w"), norm=True) if self.cfg.teacher_pool == "mean" \
            else self._cls(rearrange(clip, "b c t h w -> (b t) c h w"))
        emb = tokens.mean(1) if tokens.dim() == 3 else tokens
        return emb.float().reshape(b, t, -1).mean(1)

    def _cls(self, frames):
        enc = self.frozen.encoder
        if self.frozen.timm_model:
            h = enc.norm(enc.blocks(enc.norm_pre(enc.patch_drop(enc._pos_embed(enc.patch_embed(
                frames.to(next(enc.parameters()).dtype)))))))
            return h[:, 0]
        if getattr(enc, "cls_token", None) is None:
            raise ValueError("teacher_pool=cls needs a teacher with a CLS token; use method.iboot.teacher_pool=mean")
        return enc(frames.to(next(enc.parameters()).dtype))[:, 0]

    def forward(self, batch: Batch) -> StepOutput:
        first, second = batch.video, batch.views["long"]
        pairs = [(first, second)] + ([(second, first)] if self.cfg.symmetric else [])
        losses = [(2 - 2 * F.cosine_similarity(self.student(a).float(), self.teacher_embedding(b), dim=-1)).mean()
                  for a, b in pairs]
        loss = sum(losses) / len(losses)
        return StepOutput(loss, {"loss/iboot": loss.detach()})
