"""VideoMAE: tube-masked video autoencoding with per-patch normalised pixel targets."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config.schema import Config
from ..data.batch import Batch
from ..models import build_encoder
from ..models.heads import MaskedDecoder
from .base import Method, StepOutput, restore_decoders
from .losses import masked_mse, pixel_targets


class MAEStudent(nn.Module):
    """Encoder on visible tokens + pixel decoder: everything the engine trains."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, video, mask):  # [B,C,T,H,W], [B,N] → [B,Nm,P*C]
        return self.decoder(self.encoder(video, mask), mask)


class VideoMAE(Method):
    def __init__(self, cfg: Config):
        m, mae = cfg.model, cfg.method.mae
        encoder, ck = build_encoder(m, with_checkpoint=True)
        out_dim = 3 * math.prod(encoder.patch_size)
        decoder = MaskedDecoder(encoder.num_patches, encoder.embed_dim, mae.decoder_dim, mae.decoder_depth,
                                mae.decoder_heads, out_dim, m.attn_backend, m.grad_ckpt, drop_path=m.drop_path)
        if ck is not None:  # a pretraining checkpoint continues with its decoder (the official --resume loads it all)
            restore_decoders(ck, {"decoder": decoder}, "method.mae.decoder_dim/decoder_depth/decoder_heads")
        super().__init__(MAEStudent(encoder, decoder))
        self.patch_size, self.norm_pix = encoder.patch_size, mae.norm_pix_loss
        self.register_buffer("mean", torch.tensor(cfg.data.mean).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.data.std).view(1, 3, 1, 1, 1), persistent=False)

    def forward(self, batch: Batch) -> StepOutput:
        pred = self.student(batch.video, batch.mask)  # [B,Nm,P*C]
        pixels = batch.video * self.std + self.mean  # back to [0,1]: the targets are raw pixels
        with torch.no_grad():
            targets = pixel_targets(pixels, self.patch_size, self.norm_pix)  # [B,N,P*C]
        loss = masked_mse(pred, targets, batch.mask)
        return StepOutput(loss, {"loss/pixel": loss.detach()})
