"""Fit a k-means patch tokenizer for BEVT's targets on your own shards, offline.

    vssl-fit-tokenizer /shards/k400/manifest.json tokenizer.pt --codes 8192 --frames 200000 --size 224

Frames are drawn with the same scale-crop view as training, resized to half size (112² for 224²) like the
DALL-E tokenizer input, cut into 8×8 patches (so 14×14 codes per frame), normalised per patch, clustered.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..config.schema import DataConfig
from ..data.build import stream, view_from
from ..teachers.tokenizers import KMeansTokenizer, fit_kmeans
from ..cli import HelpFormatter


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vssl-fit-tokenizer", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("shards", help="manifest.json / brace pattern of video or image shards")
    p.add_argument("out", help="output file (.pt) for method.bevt.tokenizer_weights")
    p.add_argument("--codes", type=int, default=8192, help="codebook size (DALL-E: 8192)")
    p.add_argument("--frames", type=int, default=20000, help="frames to sample")
    p.add_argument("--patches", type=int, default=400000, help="patches kept for clustering (random subset)")
    p.add_argument("--size", type=int, default=224, help="training input size (the tokenizer sees half of it)")
    p.add_argument("--short-range", type=int, nargs=2, default=[256, 320], help="short side before the crop")
    p.add_argument("--iters", type=int, default=20, help="k-means iterations")
    p.add_argument("--workers", type=int, default=2, help="data workers")
    p.add_argument("--seed", type=int, default=0, help="sampling and initialisation seed")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    d = DataConfig(train=args.shards, batch_size=8, num_frames=4, sampling_rate=4, size=args.size,
                   short_range=list(args.short_range), num_workers=args.workers, shuffle_buffer=64,
                   resampled=True, epoch_size=10 ** 9, pin_memory=False)
    try:
        loader, _ = stream(d, d.train, view_from(d, "scale_crop"), d.batch_size, None, 0, 1, args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    chunks, seen = [], 0
    with tqdm(total=args.frames, desc="sampling frames", unit="frames") as bar:
        for batch in loader:
            frames = batch.video.permute(0, 2, 1, 3, 4).flatten(0, 1).float() / 255  # [B*T,3,H,W]
            frames = F.interpolate(frames, size=args.size // 2, mode="bilinear", antialias=True, align_corners=False)
            chunks.append(KMeansTokenizer.patches(frames, 8).flatten(0, 1))
            seen += frames.shape[0]
            bar.update(frames.shape[0])
            if seen >= args.frames:
                break
    patches = torch.cat(chunks)
    g = torch.Generator().manual_seed(args.seed)
    patches = patches[torch.randperm(len(patches), generator=g)[:args.patches]]
    print(f"clustering {len(patches)} patches from {seen} frames into {args.codes} codes", flush=True)
    codebook = fit_kmeans(patches, args.codes, args.iters, args.seed)
    torch.save({"codebook": codebook, "patch": 8, "size": args.size // 2}, args.out)
    print(f"tokenizer written to {args.out} (use method.bevt.tokenizer=kmeans "
          f"method.bevt.tokenizer_weights={args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
