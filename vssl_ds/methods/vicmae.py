"""ViC-MAE (Hernandez et al.): an image MAE on two frames of one video (an image gives itself twice), plus a
contrastive term: the mean of each frame's visible tokens after the final LayerNorm (no CLS) → projector →
NT-Xent over the 2B embeddings gathered from every rank. Loss = 0.03·contrastive + 0.97·mean(reconstructions)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..config.schema import Config
from ..data.batch import Batch
from ..engine.dist import all_gather_grad
from ..models import build_encoder
from ..models.heads import MaskedDecoder, mlp_head
from .base import Method, StepOutput, restore_decoders
from .losses import patchify


class ViCMAEStudent(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: nn.Module, projector: nn.Module):
        super().__init__()
        self.encoder, self.decoder, self.projector = encoder, decoder, projector

    def forward(self, frames, mask):
        """frames [2B,C,H,W] (view 1 then view 2), mask [2B,N] → (predictions [2B,Nm,P], embeddings [2B,E])"""
        tokens = self.encoder(frames, mask)  # [2B,1+Nv,D], final LN applied
        pooled = tokens[:, self.decoder.num_prefix:].mean(1)  # visible patch tokens only, no CLS
        b = frames.shape[0] // 2  # one projector call per view: its BatchNorms see one view's statistics (official)
        return self.decoder(tokens, mask), torch.cat([self.projector(pooled[:b]), self.projector(pooled[b:])])


class ViCMAE(Method):
    def __init__(self, cfg: Config):
        m, c = cfg.model, cfg.method.vicmae
        encoder, ck = build_encoder(m, with_checkpoint=True)
        if encoder.patch_embed.proj.weight.dim() != 4:
            raise ValueError(f"ViC-MAE encodes frames with a 2D ViT (vit2d_*), got model.name={m.name}")
        prefix = 1 if encoder.cls_token is not None else 0
        decoder = MaskedDecoder(encoder.num_patches, encoder.embed_dim, c.decoder_dim, c.decoder_depth,
                                c.decoder_heads, 3 * m.patch ** 2, m.attn_backend, m.grad_ckpt, grid=encoder.grid,
                                embed_bias=True, num_prefix=prefix)
        projector = mlp_head(encoder.embed_dim, c.proj_hidden, c.proj_dim, 3, last_bn=False, hidden_bias=True)
        if ck is not None:  # a ViC-MAE pretraining checkpoint continues with its decoder and projector
            restore_decoders(ck, {"decoder": decoder, "projector": projector},
                             "method.vicmae.decoder_* / proj_hidden / proj_dim")
        super().__init__(ViCMAEStudent(encoder, decoder, projector))
        self.cfg, self.patch = c, m.patch
        self.register_buffer("mean", torch.tensor(cfg.data.mean).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.data.std).view(1, 3, 1, 1, 1), persistent=False)

    probe_pair = "second"  # the monitor's alignment / uniformity: the two frames' features

    def probe_images(self, video, mask, targets=None):
        """The health monitor's picture (vssl_ds/monitor.py): (TensorBoard tag, rows of clips)."""
        return "reconstruction", self.reconstruct(video, mask)

    @torch.no_grad()
    def reconstruct(self, video: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The first frame of normalised clips [B,C,T,H,W] under the first frame's half of a pair mask [B,2N] →
        original, masked input (hidden patches grey) and reconstruction (predictions pasted into the visible
        patches; with norm_pix_loss de-normalised with each hidden patch's own mean and std of the network input,
        the space the targets live in), each [B,C,1,H,W] in [0,1]."""
        frame = video[:, :, :1].float()
        hidden = mask[:, : mask.shape[1] // 2]
        student = self.trainable
        pred = student.decoder(student.encoder(frame[:, :, 0], hidden), hidden).float()  # [B,Nm,P*C]
        x = patchify(frame, (1, self.patch, self.patch)).flatten(2)  # [B,N,P*C], network-input space
        guess = pred.reshape(-1, x.shape[-1])
        if self.cfg.norm_pix_loss:
            h = x[hidden]
            guess = guess * (h.var(-1, keepdim=True) + 1e-6).sqrt() + h.mean(-1, keepdim=True)
        recon = x.clone()
        recon[hidden] = guess
        g = frame.shape[-1] // self.patch
        back = lambda z: rearrange(z, "b (t h w) (p0 p1 p2 c) -> b c (t p0) (h p1) (w p2)", t=1, h=g, w=g,  # noqa
                                   p0=1, p1=self.patch, p2=self.patch, c=3) * self.std + self.mean
        pixels = (frame * self.std + self.mean).clamp(0, 1)
        masked = back(x).clamp(0, 1)
        masked = torch.where(hidden.reshape(-1, 1, 1, g, 1, g, 1).expand(-1, 3, 1, g, self.patch, g, self.patch)
                             .reshape(pixels.shape), torch.full_like(pixels, 0.5), masked)
        return {"original": pixels, "masked": masked, "reconstruction": back(recon).clamp(0, 1)}

    def pixel_targets(self, frames: torch.Tensor) -> torch.Tensor:
        """MAE targets: each patch of the network input (the ImageNet-normalised frame, as the official
        `mse_loss(imgs, …)`), normalised by the patch's own mean / unbiased var (eps inside the root).  # [B,N,p*p*3]"""
        x = patchify(frames.float()[:, :, None], (1, self.patch, self.patch)).flatten(2)  # [B,N,P*C]
        if self.cfg.norm_pix_loss:
            x = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6) ** 0.5
        return x

    def forward(self, batch: Batch) -> StepOutput:
        c = self.cfg
        first, second = batch.video[:, :, 0], batch.views["second"][:, :, 0]  # [B,C,H,W] each
        b, n = first.shape[0], batch.mask.shape[1] // 2
        frames = torch.cat([first, second])
        mask = torch.cat([batch.mask[:, :n], batch.mask[:, n:]])  # each view its own random mask
        pred, z = self.student(frames, mask)
        with torch.no_grad():
            target = self.pixel_targets(frames)[mask].reshape(pred.shape)
        recon = ((pred.float() - target) ** 2).mean(-1)  # [2B,Nm]
        loss_rec = (recon[:b].mean() + recon[b:].mean()) / 2
        loss_ctr = nt_xent(all_gather_grad(z[:b]), all_gather_grad(z[b:]), c.temperature)
        loss = c.contrastive_weight * loss_ctr + c.reconstruction_weight * loss_rec
        return StepOutput(loss, {"loss/reconstruction": loss_rec.detach(), "loss/contrastive": loss_ctr.detach()})


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss over 2N embeddings: each embedding's positive is its other view, the rest are negatives."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=-1)
    n = z1.shape[0]
    sim = (z @ z.t() / temperature).fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, target)
