"""One attention function, several backends that agree numerically (tests/test_attention.py).

q, k, v: [B,H,N,D]; bias: broadcastable to [B,H,N,N] (Swin relative-position bias, shift masks).
"""
from __future__ import annotations

import functools
import logging
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


@functools.cache
def xformers_unusable() -> str | None:
    """None when xformers' memory-efficient kernel runs on this machine's CUDA device, else the reason.

    Importing is not enough: a wheel built for another torch / CUDA imports, warns "can't load C++/CUDA
    extensions", and then fails at the first call (seen on an H200 with torch 2.11+cu130 and xformers 0.0.35,
    which was built for 2.10+cu128) — so one tiny call decides."""
    xops = _xformers_ops()
    if xops is None:
        return "xformers is not installed (pip install '.[gpu]')"
    if not torch.cuda.is_available():
        return "there is no CUDA device"
    try:
        q = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.bfloat16)  # [B,N,H,D]
        xops.memory_efficient_attention(q, q, q)
    except Exception as e:  # NotImplementedError ("no operator found"), missing extension, …
        import xformers

        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return (f"xformers {xformers.__version__} is installed but its CUDA kernels do not run with torch "
                f"{torch.__version__} here ({type(e).__name__}: {first}); install an xformers build for this torch/CUDA")
    return None


def resolve_backend(name: str, device: torch.device | None = None) -> str:
    """`auto` → xformers on CUDA when its kernels run here, else SDPA; an impossible explicit choice is an error."""
    cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if name == "auto":
        if not cuda:
            return "sdpa"
        why = xformers_unusable()
        if why is not None and _xformers_ops() is not None:
            _warn_once(f"model.attn_backend=auto uses SDPA: {why}")
        return "sdpa" if why else "xformers"
    if name == "xformers" and _xformers_ops() is None:
        raise RuntimeError("model.attn_backend=xformers but xformers is not installed: pip install '.[gpu]'")
    if name == "xformers" and cuda and xformers_unusable():
        raise RuntimeError(f"model.attn_backend=xformers: {xformers_unusable()}; or set model.attn_backend=sdpa")
    if name not in ("xformers", "sdpa", "math"):
        raise ValueError(f"unknown attention backend '{name}' (auto | xformers | sdpa | math)")
    return name


@functools.cache
def _warn_once(message: str) -> None:
    logging.getLogger(__name__).warning(message)


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
