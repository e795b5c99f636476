"""VideoMAE: tube-masked video autoencoding with per-patch normalised pixel targets."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from einops import rearrange

from ..config.schema import Config
from ..data.batch import Batch
from ..models import build_encoder
from ..models.heads import MaskedDecoder
from .base import Method, StepOutput, restore_decoders
from .losses import masked_mse, patchify, pixel_targets


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

    def probe_images(self, video, mask, targets=None):
        """The health monitor's picture (vssl_ds/monitor.py): (TensorBoard tag, rows of clips)."""
        return "reconstruction", self.reconstruct(video, mask)

    @torch.no_grad()
    def reconstruct(self, video: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the model makes of masked clips, to look at: video [B,C,T,H,W] normalised, mask [B,N] → original,
        masked input (hidden tubelets grey) and reconstruction (predicted tubelets pasted into the visible ones;
        with norm_pix_loss the prediction is de-normalised with each tubelet's own mean and std, as the MAE demo
        does), each [B,C,T,H,W] in [0,1]."""
        pred = self.trainable(video, mask).float()  # the module itself: no engine counters, ZeRO-3 hooks gather
        pixels = (video.float() * self.std + self.mean).clamp(0, 1)
        x = patchify(pixels, self.patch_size)  # [B,N,P,C]
        b, n, p, c = x.shape
        guess = pred.reshape(-1, p, c)
        if self.norm_pix:
            hidden = x[mask]
            guess = guess * (hidden.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6) + \
                hidden.mean(dim=-2, keepdim=True)
        recon, masked = x.clone(), x.clone()
        recon[mask] = guess.clamp(0, 1)
        masked[mask] = 0.5
        pt, ph, pw = self.patch_size
        t, h, w = pixels.shape[2] // pt, pixels.shape[3] // ph, pixels.shape[4] // pw
        back = lambda z: rearrange(z, "b (t h w) (p0 p1 p2) c -> b c (t p0) (h p1) (w p2)", t=t, h=h, w=w,  # noqa
                                   p0=pt, p1=ph, p2=pw)
        return {"original": pixels, "masked": back(masked), "reconstruction": back(recon)}
