"""Run under `deepspeed --num_gpus 2`: k engine steps on a tiny model with an EMA target, updated through the
engine's ZeRO-3 gather; rank 0 checks it against an EMA computed by hand from the full online weights."""
import sys

import torch
import torch.nn as nn

from vssl_ds.config.loader import load_config
from vssl_ds.data.batch import Batch
from vssl_ds.engine import dist
from vssl_ds.engine.deepspeed import Engine, init_distributed
from vssl_ds.methods.base import Method, StepOutput
from vssl_ds.methods.ema import EMA


class Probe(Method):
    def __init__(self):
        online = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
        super().__init__(online, EMA(online))

    def forward(self, batch: Batch) -> StepOutput:
        loss = self.student(batch.video).pow(2).mean()
        return StepOutput(loss, {})


def main(stage: int, steps: int = 5, momentum: float = 0.9) -> int:
    cfg = load_config("tiny_mae", [f"engine.zero_stage={stage}", "optim.lr=0.05", "optim.weight_decay=0.0"])
    device = init_distributed(cfg)
    torch.manual_seed(0)
    method = Probe()
    engine = Engine(cfg, method, device)
    engine.set_schedule(0.05, 0.0)
    hand = {k: v.clone() for k, v in engine.full_state_dict().items()}  # target starts as the online copy
    g = torch.Generator().manual_seed(torch.distributed.get_rank())
    for _ in range(steps):
        out = method(Batch(video=torch.randn(4, 6, generator=g)))
        engine.backward(out.loss)
        engine.step()
        method.frozen.update(method.trainable, momentum)
        online = engine.full_state_dict()
        hand = {k: momentum * hand[k] + (1 - momentum) * online[k] for k in hand}
    target = {k: v for k, v in method.frozen.target.state_dict().items()}
    err = max((target[k] - hand[k]).abs().max().item() for k in hand)
    moved = max((target[k] - online[k]).abs().max().item() for k in hand)
    print(f"rank {torch.distributed.get_rank()} stage {stage}: ema error {err:.2e}, target-online gap {moved:.2e}")
    dist.shutdown()
    return 0 if err < 1e-6 and moved > 1e-4 else 1


if __name__ == "__main__":
    dist.leave(main(int(next(a for a in sys.argv[1:] if not a.startswith("--")))))
