"""Cached teacher targets as shard members: fp16 arrays, or int8 with a per-token fp16 scale (see
vssl_ds/teachers/cache.py for the layout of a target shard)."""
from __future__ import annotations

import io

import numpy as np
import torch


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_targets(name: str, k: int, x: torch.Tensor, dtype: str) -> dict[str, bytes]:
    """x [N,D] float → the members of view k's target `name`."""
    if dtype == "uint16":  # token ids (BEVT): exact
        return {f"v{k}.{name}.npy": npy_bytes(x.cpu().numpy().astype(np.uint16))}
    x = x.float().cpu()
    if dtype == "int8":  # symmetric per-token scale: max |x| of the token maps to 127
        scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
        q = (x / scale).round().clamp(-127, 127).to(torch.int8)
        return {f"v{k}.{name}.npy": npy_bytes(q.numpy()), f"v{k}.{name}_scale.npy": npy_bytes(scale.half().numpy())}
    if dtype == "fp16":
        return {f"v{k}.{name}.npy": npy_bytes(x.half().numpy())}
    raise ValueError(f"cache dtype must be fp16, int8 or uint16, got '{dtype}'")


SCALE = "_scale"  # an int8 target `name` travels with its per-token scale as `name_scale`


def decode_targets(raw: dict, name: str, k: int) -> torch.Tensor:
    """The float32 [N,D] target `name` of view k (int64 [N] for token ids) from a joined raw sample."""
    return widen_targets(stored_targets(raw, name, k))[name]


def stored_targets(raw: dict, name: str, k: int) -> dict[str, torch.Tensor]:
    """Target `name` of view k as stored, for the trip to the device: {name: fp16 [N,D]} or {name: int8 [N,D],
    name_scale: fp16 [N,1]}, or {name: int64 [N]} for token ids. Half (fp16) or a quarter (int8) of the bytes a
    float32 copy would move through the data workers' queues and the host-to-device copy."""
    q = npy_load(raw[f"v{k}.{name}.npy"])
    if q.dtype == np.uint16:
        return {name: torch.from_numpy(q.astype(np.int64))}
    out = {name: torch.from_numpy(q)}
    scale = raw.get(f"v{k}.{name}{SCALE}.npy")
    if scale is not None:
        out[name + SCALE] = torch.from_numpy(npy_load(scale))
    return out


def widen_targets(targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stored targets → float32 (int8 x its scale; fp16 widened), token ids unchanged; on whatever device they
    are (the rank's, after Batch.to: the widening runs there)."""
    out = {}
    for name, x in targets.items():
        if name.endswith(SCALE) and name[:-len(SCALE)] in targets:
            continue
        if x.dtype == torch.int8:
            out[name] = x.float() * targets[name + SCALE].float()
        elif x.is_floating_point():
            out[name] = x.float()
        else:
            out[name] = x
    return out
