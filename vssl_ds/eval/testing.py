"""The test pass: every labelled test video once, as clips x crops views whose softmax scores are averaged
(VideoMAE's multi-view testing), top-1 / top-5 summed over ranks."""
from __future__ import annotations

import logging
from typing import Callable

import torch

from ..config.schema import Config
from ..data.pipeline import named_worker_deaths
from ..data.transforms import normalize
from ..engine import dist
from .data import eval_loader
from .metrics import TopK

log = logging.getLogger(__name__)
EVAL_ADVICE = ("A test video that crashes the decoder or needs more memory than a worker has stops every test pass at "
               "it: re-make that shard without it (make_shards from a CSV without that video)")


def view_batches(spec: str, cfg: Config, clips: int, crops: int, device: torch.device, batch_size: int,
                 lockstep: bool = False, progress: str = ""):
    """→ (video [B*V,C,T,H,W] normalised on `device`, labels [B], B, keys) per batch. With `lockstep` (ZeRO-3
    shards the weights: every forward is collective) a rank out of videos yields (dummy clip, None, 0, [])
    until every rank is done. `progress`: rank 0 shows a bar of that name over its share of the videos."""
    from tqdm import tqdm

    d = cfg.data
    dataloader = eval_loader(spec, cfg, clips, crops, dist.rank(), dist.world(), batch_size)
    shards = dataloader.dataset.shards
    total = sum(s.samples for s in shards) if all(s.samples >= 0 for s in shards) else None
    loader = iter(dataloader)
    with named_worker_deaths(loader, dataloader.dataset.notes, dist.rank(), EVAL_ADVICE), \
            tqdm(total=total, desc=progress, unit="video", disable=not progress or dist.rank() != 0) as bar:
        while True:
            batch = next(loader, None)
            if lockstep:
                (pending,) = dist.any_true([batch is not None], device)
                if not pending:
                    return
                if batch is None:
                    yield torch.zeros(1, 3, d.num_frames, d.size, d.size, device=device), None, 0, []
                    continue
            elif batch is None:
                return
            video = batch["video"]  # [B,V,C,T,H,W] uint8
            b = video.shape[0]
            bar.update(b)
            yield normalize(video.flatten(0, 1).to(device), d.mean, d.std), batch["label"], b, batch["keys"]


@torch.no_grad()
def test_pass(logits_fn: Callable[[torch.Tensor], torch.Tensor], cfg: Config, clips: int, crops: int,
              device: torch.device, lockstep: bool = False) -> TopK:
    e = cfg.eval
    scores = TopK(device)
    for video, labels, b, _ in view_batches(e.val, cfg, clips, crops, device, e.test_batch_size, lockstep,
                                            progress=f"test pass ({clips} clips x {crops} crops)"):
        probs = torch.softmax(logits_fn(video).float(), -1)  # [B*V,K]
        if labels is not None:
            scores.add(probs.view(b, -1, probs.shape[-1]).mean(1), labels)
    scores.reduce()
    log.info("test pass: %d videos x %d clips x %d crops: top-1 %.2f %%, top-5 %.2f %%", scores.count, clips, crops,
             scores.top1, scores.top5)
    if scores.count == 0:
        raise RuntimeError(f"the test pass saw no video: eval.val={e.val!r} yielded nothing readable (see the "
                           "warnings above)")
    return scores
