"""Run under `deepspeed --num_gpus 2 skip_probe.py STAGE:PRECISION ...`: engine windows of 2 micro-steps on a tiny model,
where one rank's loss is made non-finite in one micro-step (NaN, whose gradients are NaN; or +inf added as a
constant, whose gradients stay finite). Each such window must leave every rank's master weights, AdamW moments and
step counts bitwise as they were, and the next clean window must move them again. Prints `PROBE {setting: [report per rank]}`
(rank 0)."""
import json
import sys

import torch
import torch.nn as nn
from vssl_ds.config.loader import load_config
from vssl_ds.data.batch import Batch
from vssl_ds.engine import dist
from vssl_ds.engine.deepspeed import Engine, init_distributed
from vssl_ds.methods.base import Method, StepOutput


class Probe(Method):
    def __init__(self):
        super().__init__(nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 4)))

    def forward(self, batch: Batch) -> StepOutput:
        return StepOutput(self.student(batch.video).pow(2).mean(), {})


def snapshot(engine: Engine) -> list[torch.Tensor]:
    """This rank's share of what AdamW updates: its master (fp32) partitions, their moments and step counts."""
    out = []
    for p, state in engine.optimizer.state.items():  # (ZeRO-3 lends its partitions to param_groups only in step)
        out += [p.detach().cpu().clone()] + [state[k].detach().cpu().clone() for k in sorted(state)]
    return out


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def probe(stage: int, precision: str) -> dict:
    cfg = load_config("tiny_mae", [f"engine.zero_stage={stage}", f"engine.precision={precision}",
                                   "engine.grad_accum=2", "optim.clip_grad=1.0", "data.batch_size=4"])
    device = init_distributed(cfg)
    torch.manual_seed(0)
    method = Probe()
    engine = Engine(cfg, method, device)
    engine.set_schedule(0.05, 0.05)
    g = torch.Generator().manual_seed(dist.rank())

    def window(spoil: str = "", on_rank: int = 1, micro: int = 1) -> list[float]:
        flags = []
        for m in range(2):
            x = torch.randn(4, 6, generator=g).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = method(Batch(video=x)).loss
            if spoil and dist.rank() == on_rank and m == micro:
                loss = loss * float("nan") if spoil == "nan" else loss + float("inf")
            flags.append(engine.backward(loss))
            engine.step()
        return [float(f) for f in flags]

    report = {"clean_moves": [], "spoilt_kept": [], "flags": []}
    window()  # the moments exist
    for spoil, on_rank, micro in (("nan", 1, 1), ("inf", 0, 0), ("nan", 0, 0)):
        before = snapshot(engine)
        report["flags"].append(window(spoil, on_rank, micro))
        report["spoilt_kept"].append(same(before, snapshot(engine)))
        before = snapshot(engine)
        window()
        after = snapshot(engine)
        report["clean_moves"].append(not same(before, after) and all(bool(torch.isfinite(t).all()) for t in after))
    return report


def main(settings: list[str]) -> int:
    reports = {}
    for setting in settings:  # "STAGE:PRECISION", one engine after the other in this process
        stage, precision = setting.split(":")
        reports[setting] = dist.all_gather_object(probe(int(stage), precision))  # every rank checks its own share
    if dist.rank() == 0:
        print("PROBE " + json.dumps(reports), flush=True)
    dist.shutdown()
    return 0


if __name__ == "__main__":
    dist.leave(main([a for a in sys.argv[1:] if not a.startswith("--local_rank")]))
