"""Parameters and FLOPs of a registered model, counted on the meta device (no memory, no compute).

FLOPs are reported as multiply-accumulates (GMACs), the convention of the VideoMAE / Video Swin /
TimeSformer papers ("180 GFLOPs" for ViT-B on 16×224²); torch's counter reports 2 per MAC.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .registry import create_model


def input_for(model, batch: int = 1, device="meta") -> torch.Tensor:
    """A dummy input of the size the model was built for."""
    if isinstance(model.patch_size, int):  # a 2D model
        h = model.grid[0] * model.patch_size
        return torch.zeros(batch, 3, h, h, device=device)
    t, h = model.grid[0] * model.patch_size[0], model.grid[1] * model.patch_size[1]
    return torch.zeros(batch, 3, t, h, h, device=device)


def model_stats(name: str, **kwargs) -> dict:
    """→ {"params_m": millions of parameters, "gflops": GMACs of one forward on one clip/image}."""
    with torch.device("meta"):
        model = create_model(name, attn_backend="math", **kwargs)
    model = model.to("meta")  # fixed tables (sin-cos) are made on the CPU
    params = sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(input_for(model))
    return {"params_m": params / 1e6, "gflops": counter.get_total_flops() / 2 / 1e9}
