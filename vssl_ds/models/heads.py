"""Heads that sit on an encoder: the MAE pixel / feature decoder."""
from __future__ import annotations

import torch
import torch.nn as nn

from .layers import Block, resolve_backend, run_blocks, sincos_2d_table, sincos_3d_table, sincos_table
from .vit import init_weights


class MaskedDecoder(nn.Module):
    """VideoMAE / MVD decoder: visible tokens + mask tokens, each with its fixed position (VideoMAE's 1D table,
    or MVD's 3D one when `grid` is given), through `depth` blocks; predicts `out_dim` values for every masked
    token, in the order the mask lists them. Stochastic depth grows over the decoder's blocks up to `drop_path`,
    as in the official VideoMAE / MVD decoders (which take the encoder's rate)."""

    def __init__(self, num_patches: int, enc_dim: int, dim: int, depth: int, heads: int, out_dim: int,
                 attn_backend: str = "auto", grad_ckpt: bool = False, grid: tuple | None = None,
                 embed_bias: bool = False, num_prefix: int = 0, drop_path: float = 0.0):
        super().__init__()
        self.num_prefix = num_prefix  # encoder tokens before the patches (CLS): kept, without position
        self.embed = nn.Linear(enc_dim, dim, bias=embed_bias)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        table = sincos_table(num_patches, dim) if grid is None else \
            sincos_3d_table(grid, dim) if len(grid) == 3 else sincos_2d_table(grid, dim)
        self.register_buffer("pos_embed", table, persistent=False)
        backend = resolve_backend(attn_backend)
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # as the encoder (official decoders)
        self.blocks = nn.ModuleList(Block(dim, heads, 4.0, True, r, backend) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, out_dim)
        self.grad_ckpt = grad_ckpt
        init_weights(self)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, visible: torch.Tensor, mask: torch.Tensor, every_token: bool = False) -> torch.Tensor:
        """visible [B,Nv,E], mask [B,N] → predictions for the masked tokens [B,Nm,out_dim] in mask order, or with
        `every_token` for all tokens in token order [B,N,out_dim] (MAE's decoder output)."""
        b, s = visible.shape[0], self.num_prefix
        x = self.embed(visible)  # [B,s+Nv,D]
        pos = self.pos_embed.to(x.dtype).expand(b, -1, -1)  # [B,N,D]
        pos_vis = pos[~mask].reshape(b, -1, x.shape[-1])
        pos_mask = pos[mask].reshape(b, -1, x.shape[-1])
        x = torch.cat([x[:, :s], x[:, s:] + pos_vis, self.mask_token.to(x.dtype) + pos_mask], dim=1)  # [B,s+N,D]
        x = run_blocks(self.blocks, x, self.grad_ckpt, self.training)
        if every_token:  # tokens sit as [prefix, visible…, masked…]: put them back in token order
            order = torch.cat([(~mask).nonzero()[:, 1].view(b, -1), mask.nonzero()[:, 1].view(b, -1)], 1)  # [B,N]
            x = torch.empty_like(x[:, s:]).scatter_(1, order[..., None].expand(-1, -1, x.shape[-1]), x[:, s:])
            return self.head(self.norm(x))  # [B,N,out_dim]
        num_masked = pos_mask.shape[1]
        return self.head(self.norm(x[:, -num_masked:]))  # [B,Nm,out_dim]


def mlp_head(in_dim: int, hidden: int, out_dim: int, layers: int, last_bn: bool = True,
             last_affine: bool = False, hidden_bias: bool = False) -> nn.Sequential:
    """MoCo v3 / BYOL / SimSiam projector and predictor: (Linear → BN → ReLU) × (layers−1) → Linear
    [→ BN, without affine parameters for MoCo v3's projector]. `hidden_bias`: the hidden Linears keep a bias
    (ViC-MAE's projector)."""
    mods: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(dim, hidden, bias=hidden_bias), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        dim = hidden
    mods.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        mods.append(nn.BatchNorm1d(out_dim, affine=last_affine))
    return nn.Sequential(*mods)
