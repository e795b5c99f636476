"""One attention function, several backends that agree numerically (tests/test_attention.py).

q, k, v: [B,H,N,D]; bias: broadcastable to [B,H,N,N] (Swin relative-position bias, shift masks).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


@functools.cache
def _xformers_ops():
    try:
        import xformers.ops as xops
    except ImportError:
        return None
    return xops


def resolve_backend(name: str, device: torch.device | None = None) -> str:
    """`auto` → xformers on CUDA when installed, else SDPA; an impossible explicit choice is an error."""
    cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if name == "auto":
        return "xformers" if cuda and _xformers_ops() is not None else "sdpa"
    if name == "xformers" and _xformers_ops() is None:
        raise RuntimeError("model.attn_backend=xformers but xformers is not installed: pip install '.[gpu]'")
    if name not in ("xformers", "sdpa", "math"):
        raise ValueError(f"unknown attention backend '{name}' (auto | xformers | sdpa | math)")
    return name


def _math(q, k, v, bias):
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # [B,H,N,N]
    if bias is not None:
        scores = scores + bias
    return scores.softmax(-1) @ v


def _xformers(q, k, v, bias):
    xops = _xformers_ops()
    if bias is not None:  # xformers wants a materialised bias with an aligned last dim
        bias = bias.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        pad = (-bias.shape[-1]) % 8
        bias = F.pad(bias, (0, pad))[..., : k.shape[2]] if pad else bias.contiguous()
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    return out.transpose(1, 2)  # xformers works in [B,N,H,D]


def attention(q, k, v, bias=None, backend: str = "sdpa"):
    """softmax(q kᵀ/√d + bias) v.  # [B,H,N,D]"""
    if backend == "xformers" and q.is_cuda:
        return _xformers(q, k, v, bias)
    if backend == "math":
        return _math(q, k, v, bias)
    if bias is not None:
        bias = bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
