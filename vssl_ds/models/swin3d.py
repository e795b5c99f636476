"""Video Swin Transformer (3D shifted windows, relative position bias, patch merging) with mask-token
injection (BEVT: Swin cannot drop tokens), and the space-time variant whose windows span the whole clip
(LSTCL's Swin). Parameter names follow the official Video Swin code, so its checkpoints load after the
`backbone.` prefix is stripped (weights.py). Attention runs through the shared backends, with the relative
position bias and the shifted-window mask passed as one additive bias."""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from .layers.common import DropPath, Mlp

from .layers import attention, resolve_backend
from .registry import register_model


def fit_window(size, window, shift):
    """A window no larger than the input along each axis; no shift where the window covers the axis."""
    window, shift = list(window), list(shift)
    for i in range(3):
        if size[i] <= window[i]:
            window[i], shift[i] = size[i], 0
    return tuple(window), tuple(shift)


def partition(x, w):
    """[B,D,H,W,C] → windows [B*nW, w0*w1*w2, C]"""
    return rearrange(x, "b (d w0) (h w1) (w w2) c -> (b d h w) (w0 w1 w2) c", w0=w[0], w1=w[1], w2=w[2])


def reverse(windows, w, b, d, h, wd):
    return rearrange(windows, "(b d h w) (w0 w1 w2) c -> b (d w0) (h w1) (w w2) c", b=b, d=d // w[0], h=h // w[1],
                     w=wd // w[2], w0=w[0], w1=w[1], w2=w[2])


@functools.lru_cache(maxsize=64)
def shift_mask(d, h, w, window, shift, device) -> torch.Tensor:
    """-100 between tokens of one shifted window that came from different regions.  # [nW,N,N]"""
    img = torch.zeros(1, d, h, w, 1, device=device)
    cnt = 0
    for sd in (slice(-window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
        for sh in (slice(-window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
            for sw in (slice(-window[2]), slice(-window[2], -shift[2]), slice(-shift[2], None)):
                img[:, sd, sh, sw] = cnt
                cnt += 1
    regions = partition(img, window).squeeze(-1)  # [nW,N]
    m = regions.unsqueeze(1) - regions.unsqueeze(2)
    return m.masked_fill(m != 0, -100.0).masked_fill(m == 0, 0.0)


@functools.lru_cache(maxsize=64)
def relative_index(full: tuple, window: tuple, rule: str) -> torch.Tensor:
    """Index into a relative-position table built for window `full`, for attention within `window` (smaller
    where the input is).  # [N,N]
    - `official`: the first N rows and columns of the full window's index, as the official Video Swin / BEVT
      code (`relative_position_index[:N, :N]`): every released checkpoint was trained with it;
    - `window`: the index of the smaller window itself (each pair by its own (d, h, w) offset)."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(n) for n in (full if rule == "official" else window)],
                                        indexing="ij")).flatten(1)  # [3,M]
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + torch.tensor([w - 1 for w in full])  # [M,M,3]
    index = rel[..., 0] * (2 * full[1] - 1) * (2 * full[2] - 1) + rel[..., 1] * (2 * full[2] - 1) + rel[..., 2]
    n = math.prod(window)
    return index[:n, :n]


class WindowAttention3D(nn.Module):
    def __init__(self, dim, window, heads, qkv_bias=True, backend="sdpa", rel_index="official"):
        super().__init__()
        if rel_index not in ("official", "window"):
            raise ValueError(f"model.swin_index must be 'official' or 'window', got '{rel_index}'")
        self.window, self.heads, self.backend, self.rel_index = tuple(window), heads, backend, rel_index
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1), heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, window, mask=None):
        """x [B*nW,N,C]; mask [nW,N,N] or None."""
        n = x.shape[1]
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        index = relative_index(self.window, tuple(window), self.rel_index).to(x.device).reshape(-1)
        bias = self.relative_position_bias_table[index].reshape(n, n, -1).permute(2, 0, 1)  # [H,N,N]
        bias = bias.unsqueeze(0)
        if mask is not None:  # [nW,N,N] → per window of every sample, windows fastest (partition order)
            nw = mask.shape[0]
            bias = (bias + mask.unsqueeze(1)).unsqueeze(0).expand(x.shape[0] // nw, -1, -1, -1, -1)
            bias = bias.reshape(x.shape[0], self.heads, n, n)
        out = attention(q, k, v, bias.to(q.dtype), self.backend)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class SwinBlock3D(nn.Module):
    compilable_block = True  # model.compile=true compiles it (layers.block.compile_blocks)

    def __init__(self, dim, heads, window, shift, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0, backend="sdpa",
                 rel_index="official"):
        super().__init__()
        self.window, self.shift = tuple(window), tuple(shift)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention3D(dim, window, heads, qkv_bias, backend, rel_index)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x, image_2d: bool = False):
        """x [B,D,H,W,C]. `image_2d`: BEVT's official image path (one frame): the spatial window is never shrunk
        or padded, odd blocks roll at every stage, and every block — unshifted ones too — takes the shifted-window
        mask as its attention mask (a quirk of the official code that its checkpoints were trained with)."""
        b, d, h, w, c = x.shape
        if image_2d:
            window, shift = (1, *self.window[1:]), (0, *self.shift[1:])
            if h % window[1] or w % window[2]:
                raise ValueError(f"BEVT's official image path needs every stage's grid to be a multiple of the "
                                 f"window {window[1:]}, got {h}x{w}: set model.swin_image_path=video (or a size "
                                 f"such as 224)")
            mask = shift_mask(d, h, w, window, (0, window[1] // 2, window[2] // 2), x.device)
        else:
            window, shift = fit_window((d, h, w), self.window, self.shift)
            mask = None
        y = self.norm1(x)
        pad = [(-n) % win for n, win in zip((d, h, w), window)]
        y = F.pad(y, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
        dp, hp, wp = d + pad[0], h + pad[1], w + pad[2]
        if any(shift):
            y = torch.roll(y, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
            mask = mask if image_2d else shift_mask(dp, hp, wp, window, shift, y.device)
        y = reverse(self.attn(partition(y, window), window, mask), window, b, dp, hp, wp)
        if any(shift):
            y = torch.roll(y, shifts=shift, dims=(1, 2, 3))
        x = x + self.drop_path(y[:, :d, :h, :w].contiguous())
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2×2 spatial neighbours → one token of twice the width (time is not merged)."""

    def __init__(self, dim):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x):  # [B,D,H,W,C]
        x = F.pad(x, (0, 0, 0, x.shape[3] % 2, 0, x.shape[2] % 2))
        x = torch.cat([x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    def __init__(self, dim, depth, heads, window, drop_paths, downsample, backend, grad_ckpt, rel_index="official"):
        super().__init__()
        shift = tuple(w // 2 for w in window)
        self.grad_ckpt = grad_ckpt
        self.blocks = nn.ModuleList(SwinBlock3D(dim, heads, window, (0, 0, 0) if i % 2 == 0 else shift,
                                                drop_path=drop_paths[i], backend=backend, rel_index=rel_index)
                                    for i in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x, image_2d: bool = False):
        """[B,D,H,W,C] → (this stage's output, the input of the next stage)"""
        from torch.utils.checkpoint import checkpoint

        for blk in self.blocks:
            x = checkpoint(blk, x, image_2d, use_reentrant=False) if self.grad_ckpt and self.training else \
                blk(x, image_2d)
        return x, (self.downsample(x) if self.downsample is not None else x)


class SwinPatchEmbed3D(nn.Module):
    def __init__(self, patch, in_chans, dim, norm=True):
        super().__init__()
        self.patch = tuple(patch)
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(self, x):  # [B,C,T,H,W] → [B,D',H',W',C]
        pad = [(-n) % p for n, p in zip(x.shape[2:], self.patch)]
        x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
        return self.norm(self.proj(x).permute(0, 2, 3, 4, 1))


class SwinPatchEmbed2D(nn.Module):
    """BEVT's separate image patch embedding; images then run through the same stages as a 1-frame clip."""

    def __init__(self, patch, in_chans, dim, norm=True):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(self, x):  # [B,C,H,W] → [B,1,H',W',C]
        x = F.pad(x, (0, (-x.shape[3]) % self.patch, 0, (-x.shape[2]) % self.patch))
        return self.norm(self.proj(x).permute(0, 2, 3, 1)).unsqueeze(1)


class VideoSwin(nn.Module):
    def __init__(self, img_size=224, num_frames=16, tubelet=2, patch=4, in_chans=3, embed_dim=128,
                 depths=(2, 2, 18, 2), heads=(4, 8, 16, 32), window=(8, 7, 7), drop_path=0.0, attn_backend="auto",
                 grad_ckpt=False, mask_token=True, patch_norm=True, image_embed=False, rel_index="official",
                 image_path="auto", video_embed=True):
        super().__init__()
        if image_path not in ("auto", "official", "video"):
            raise ValueError(f"model.swin_image_path must be auto | official | video, got '{image_path}'")
        self.image_path, self.window = image_path, tuple(window)
        self.patch_size = (tubelet, patch, patch)
        # video_embed=False: images only (BEVT's image-only stage); its file then inflates into a video model
        self.patch_embed = SwinPatchEmbed3D(self.patch_size, in_chans, embed_dim, patch_norm) if video_embed else None
        self.patch_embed_2d = SwinPatchEmbed2D(patch, in_chans, embed_dim, patch_norm) if image_embed else None
        self.grid = (math.ceil(num_frames / tubelet), math.ceil(img_size / patch), math.ceil(img_size / patch))
        self.num_patches = self.grid[0] * self.grid[1] * self.grid[2]
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if mask_token else None
        backend = resolve_backend(attn_backend)
        rates = [drop_path * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
        self.layers, start = nn.ModuleList(), 0
        for i, (depth, h) in enumerate(zip(depths, heads)):
            self.layers.append(SwinStage(embed_dim * 2 ** i, depth, h, window, rates[start:start + depth],
                                         i < len(depths) - 1, backend, grad_ckpt, rel_index))
            start += depth
        self.num_features = self.embed_dim = embed_dim * 2 ** (len(depths) - 1)
        self.stage_dims = [embed_dim * 2 ** i for i in range(len(depths))]
        self.norm = nn.LayerNorm(self.num_features)
        self.apply(_init)
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, video, mask=None, stages: bool = False):
        """video [B,C,T,H,W] (or an image [B,C,H,W] when built with `image_embed`); mask [B,N] (True = replaced by
        the mask token) on the patch grid or on a coarser spatial grid (e.g. BEVT's 8×14×14 for a 8×56×56 patch
        grid) → [B,C',T',H'/8,W'/8] after the final norm, or with `stages=True` the raw output of every stage
        ([B,Ci,T',Hi,Wi], before any final norm: BEVT's head applies `self.norm` itself)."""
        if video.dim() == 4:
            if self.patch_embed_2d is None:
                raise ValueError("an image input needs a Swin built with image_embed=True")
            x = self.patch_embed_2d(video.to(self.patch_embed_2d.proj.weight.dtype))  # [B,1,H,W,C]
        elif self.patch_embed is None:
            raise ValueError("a video input needs a Swin built with video_embed=True (this one takes images only)")
        else:
            x = self.patch_embed(video.to(self.patch_embed.proj.weight.dtype))  # [B,D,H,W,C]
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("this Swin was built with mask_token=False")
            x = torch.where(self._upsample_mask(mask, x.shape[1:4]).unsqueeze(-1), self.mask_token.to(x.dtype), x)
        image_2d = video.dim() == 4 and self._official_image_path(x.shape[2:4])
        outs = []
        for layer in self.layers:
            out, x = layer(x, image_2d)
            outs.append(out)
        if stages:
            return [o.permute(0, 4, 1, 2, 3).contiguous() for o in outs]
        return self.norm(outs[-1]).permute(0, 4, 1, 2, 3).contiguous()

    def _official_image_path(self, grid) -> bool:
        """Images take BEVT's official 2D path (`official`), run as one-frame clips (`video`), or (`auto`) the
        official path wherever it can run: every stage's grid a multiple of the spatial window (224 px)."""
        if self.image_path != "auto":
            return self.image_path == "official"
        h, w = grid
        sizes = [(math.ceil(h / 2 ** i), math.ceil(w / 2 ** i)) for i in range(len(self.layers))]
        return all(a % self.window[1] == 0 and b % self.window[2] == 0 for a, b in sizes)

    @staticmethod
    def _upsample_mask(mask, grid):
        d, h, w = grid
        n = mask.shape[1]
        if n == d * h * w:
            return mask.view(-1, d, h, w)
        f = math.isqrt(d * h * w // n)
        if f * f * n != d * h * w or h % f or w % f:
            raise ValueError(f"mask of {n} tokens fits neither the patch grid {grid} nor a coarser spatial grid")
        return mask.view(-1, d, h // f, w // f).repeat_interleave(f, 2).repeat_interleave(f, 3)


def _init(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _swin(defaults: dict, kw: dict, whole_clip: bool = False) -> VideoSwin:
    args = {**defaults, **kw}
    if whole_clip:  # space-time variant: every window spans all frames
        t = math.ceil(args.get("num_frames", 16) / args.get("tubelet", 2))
        args["window"] = (t, *args.get("window", (8, 7, 7))[1:])
    return VideoSwin(**args)


MICRO = dict(embed_dim=16, depths=(1, 1, 2, 1), heads=(1, 2, 2, 4), window=(2, 4, 4))
TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24))
SMALL = dict(embed_dim=96, depths=(2, 2, 18, 2), heads=(3, 6, 12, 24))
BASE = dict(embed_dim=128, depths=(2, 2, 18, 2), heads=(4, 8, 16, 32))


@register_model
def swin3d_micro(**kw):
    return _swin(MICRO, kw)


@register_model
def swin3d_tiny(**kw):
    return _swin(TINY, kw)


@register_model
def swin3d_small(**kw):
    return _swin(SMALL, kw)


@register_model
def swin3d_base(**kw):
    return _swin(BASE, kw)


@register_model
def swin3d_micro_st(**kw):
    return _swin(MICRO, kw, whole_clip=True)


@register_model
def swin3d_base_st(**kw):
    return _swin(BASE, kw, whole_clip=True)
