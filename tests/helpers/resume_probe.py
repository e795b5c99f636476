"""Run as pretrain.py would (any number of ranks): `--auto-resume` a run through the Trainer, then rank 0 compares
every parameter's full fp32 weights and AdamW moments, as the re-partitioned engine now holds them, with the
checkpoint's consolidated ones: weights from DeepSpeed's zero_to_fp32 over the saved partitions, moments from the
universal checkpoint's per-parameter files. Prints one `PROBE {json}` line (rank 0)."""
import json
import sys

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from vssl_ds.config.loader import load_config
from vssl_ds.engine import dist
from vssl_ds.engine.checkpoint import read_latest
from vssl_ds.engine.deepspeed import consolidated_weights
from vssl_ds.train import Trainer, start_process


def main(argv: list[str]) -> int:
    argv = [a for a in argv if not a.startswith("--local_rank")]
    cfg = load_config(argv[0], argv[1:])
    cfg.run.auto_resume = True
    trainer = Trainer(cfg, start_process(cfg))
    tag_dir = trainer.ckpt_dir / read_latest(trainer.ckpt_dir)
    trainer.resume()
    full = {}
    for name, p in trainer.engine.ds.module.named_parameters():  # every rank: ZeRO-3 gathers
        full[name] = [t.detach().float().cpu().clone() for t in (
            safe_get_full_fp32_param(p), safe_get_full_optimizer_state(p, "exp_avg"),
            safe_get_full_optimizer_state(p, "exp_avg_sq"))]
    if dist.rank() == 0:
        weights, _ = consolidated_weights(tag_dir)
        zero = tag_dir / "universal" / "zero"
        diff = {"fp32": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}
        for name, (w, m, v) in full.items():
            diff["fp32"] = max(diff["fp32"], (w - weights[name]).abs().max().item())
            for key, got in (("exp_avg", m), ("exp_avg_sq", v)):
                want = torch.load(zero / name / f"{key}.pt", weights_only=False)
                want = (want["param"] if isinstance(want, dict) else want).float()  # ZeRO 1-2 | ZeRO-3 layout
                diff[key] = max(diff[key], (got - want.view_as(got)).abs().max().item())
        moments = sum(float(m.abs().sum()) for _, m, _ in full.values())
        print("PROBE " + json.dumps({"diff": diff, "params": len(full), "moment_mass": moments,
                                     "grad_accum": cfg.engine.grad_accum, "step": trainer.step,
                                     "world": dist.world()}), flush=True)
    dist.shutdown()
    return 0


if __name__ == "__main__":
    dist.leave(main(sys.argv[1:]))
