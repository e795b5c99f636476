"""Visual tokenizers for BEVT's targets: frame (112²) → 14×14 token ids.

- `DalleEncoder`: the DALL-E dVAE encoder architecture (Ramesh et al. 2021; groups of residual blocks with a
  1/n² post-gain, max-pool between groups, 1×1 logits over 8192 codes), with DALL-E's parameter names
  (`blocks.input.w`, `blocks.group_1.block_1.res_path.conv_1.w`, …) so a state dict exported from the
  published `encoder.pkl` (`torch.save(enc.state_dict(), "dalle_encoder.pt")`) loads into it offline.
  Input pixels are mapped x' = 0.8·x + 0.1 for x in [0, 1] (DALL-E's `map_pixels`).
- `KMeansTokenizer`: a codebook of 8×8 RGB patches fitted by `tools/fit_tokenizer.py` on the user's own
  data: the nearest code of each (per-patch normalised) patch. It lets BEVT run where no weights can be
  downloaded; it is a weaker target than the dVAE, and says so in the logs.
"""
from __future__ import annotations

import logging
import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)


class DalleConv(nn.Module):
    def __init__(self, n_in: int, n_out: int, kw: int):
        super().__init__()
        self.w = nn.Parameter(torch.empty(n_out, n_in, kw, kw).normal_(std=1 / math.sqrt(n_in * kw * kw)))
        self.b = nn.Parameter(torch.zeros(n_out))
        self.pad = (kw - 1) // 2

    def forward(self, x):
        return F.conv2d(x, self.w, self.b, padding=self.pad)


class DalleBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        hid = n_out // 4
        self.post_gain = 1 / n_layers ** 2
        self.id_path = DalleConv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", DalleConv(n_in, hid, 3)),
            ("relu_2", nn.ReLU()), ("conv_2", DalleConv(hid, hid, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", DalleConv(hid, hid, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", DalleConv(hid, n_out, 1))]))

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoder(nn.Module):
    def __init__(self, n_hid: int = 256, n_blk_per_group: int = 2, vocab_size: int = 8192, groups: int = 4):
        super().__init__()
        self.vocab_size, n_layers = vocab_size, groups * n_blk_per_group
        layers = [("input", DalleConv(3, n_hid, 7))]
        width = n_hid
        for g in range(groups):
            out = n_hid * 2 ** g
            blocks = [(f"block_{i + 1}", DalleBlock(width if i == 0 else out, out, n_layers))
                      for i in range(n_blk_per_group)]
            if g < groups - 1:
                blocks.append(("pool", nn.MaxPool2d(kernel_size=2)))
            layers.append((f"group_{g + 1}", nn.Sequential(OrderedDict(blocks))))
            width = out
        layers.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()),
                                                             ("conv", DalleConv(width, vocab_size, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(layers))

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B,3,H,W] in [0,1] → code logits [B,V,H/8,W/8]. Under autocast the trunk runs in low precision
        but the 1×1 logits conv in fp32, as DALL-E keeps it (the argmax is sensitive to it)."""
        x = self.blocks[:-1](0.8 * pixels.to(self.blocks.input.w.dtype) + 0.1)  # DALL-E's map_pixels
        with torch.autocast(x.device.type, enabled=False):
            return self.blocks.output(x.float())

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B,3,H,W] in [0,1] → token ids [B,(H/8)*(W/8)]"""
        return self.logits(pixels).argmax(1).flatten(1)


class KMeansTokenizer(nn.Module):
    """Nearest-code ids of non-overlapping `patch`×`patch` RGB patches (each patch normalised by its own
    mean/std, as MAE's targets, so codes capture structure rather than brightness)."""

    def __init__(self, codebook: torch.Tensor, patch: int = 8):
        super().__init__()
        self.patch, self.vocab_size = patch, codebook.shape[0]
        self.register_buffer("codebook", codebook.float())

    @staticmethod
    def patches(pixels: torch.Tensor, patch: int) -> torch.Tensor:
        """[B,3,H,W] → normalised patches [B,(H/p)*(W/p),3*p*p]"""
        x = F.unfold(pixels.float(), kernel_size=patch, stride=patch).transpose(1, 2)
        return (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-6)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patches(pixels, self.patch)
        return torch.cdist(x, self.codebook.expand(x.shape[0], -1, -1)).argmin(-1)  # [B,N]


def fit_kmeans(patches: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means on [M,D] patches → codebook [k,D], seeded by k-means++ on a subsample of at most
    20 000 patches (random seeds fall into the same cluster and stay there). An empty cluster is re-seeded
    with the point farthest from its code."""
    g = torch.Generator().manual_seed(seed)
    m = patches.shape[0]
    if m < k:
        raise ValueError(f"k-means needs at least {k} patches, got {m}: use more clips or a smaller vocabulary")
    sub = patches[torch.randperm(m, generator=g)[:max(k, min(m, 20000))]]
    chosen = [int(torch.randint(len(sub), (1,), generator=g))]
    d2 = ((sub - sub[chosen[0]]) ** 2).sum(1)
    for _ in range(1, k):  # k-means++: each next seed drawn in proportion to its squared distance
        nxt = int(torch.multinomial(d2 + 1e-12, 1, generator=g)) if d2.sum() > 0 else int(d2.argmax())
        chosen.append(nxt)
        d2 = torch.minimum(d2, ((sub - sub[nxt]) ** 2).sum(1))
    centers = sub[chosen].clone()
    for _ in range(iters):
        dist = torch.cdist(patches, centers)
        assign = dist.argmin(1)
        sums = torch.zeros_like(centers).index_add_(0, assign, patches)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        empty = counts.squeeze(1) == 0
        centers = torch.where(counts > 0, sums / counts.clamp(min=1), centers)
        if empty.any():
            centers[empty] = patches[dist.min(1).values.topk(int(empty.sum())).indices]
    return centers


def build_tokenizer(kind: str, weights: str) -> nn.Module:
    """`dalle` (a DALL-E encoder state dict) or `kmeans` (a file written by tools/fit_tokenizer.py); frozen."""
    path = Path(weights)
    if not weights or not path.is_file():
        raise FileNotFoundError(f"tokenizer weights '{weights}' do not exist: export the DALL-E encoder to a state "
                                "dict, or fit one with tools/fit_tokenizer.py (method.bevt.tokenizer_weights)")
    return tokenizer_from_state(kind, torch.load(path, map_location="cpu", weights_only=True), str(path))


def tokenizer_from_state(kind: str, state: dict, path: str) -> nn.Module:
    """A frozen tokenizer from its state dict (a file's, or the one a BEVT checkpoint holds in its head)."""
    if kind == "dalle":
        if "blocks.input.w" not in state:
            raise ValueError(f"'{path}' is not a DALL-E encoder state dict (no 'blocks.input.w')")
        blocks = {k.split(".")[2] for k in state if k.startswith("blocks.group_1.block_")}
        tok = DalleEncoder(n_hid=state["blocks.input.w"].shape[0], n_blk_per_group=len(blocks),
                           vocab_size=state["blocks.output.conv.w"].shape[0])
        tok.load_state_dict(state)
    elif kind == "kmeans":
        if "codebook" not in state:
            raise ValueError(f"'{path}' has no 'codebook': write it with tools/fit_tokenizer.py")
        tok = KMeansTokenizer(state["codebook"], int(state.get("patch", 8)))
        log.info("BEVT targets from a k-means tokenizer (%d codes): a weaker target than the DALL-E dVAE",
                 tok.vocab_size)
    else:
        raise ValueError(f"unknown tokenizer '{kind}' (dalle | kmeans)")
    tok.requires_grad_(False)
    return tok.eval()
