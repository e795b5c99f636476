"""Counts, metadata statistics and a contact sheet of sampled frames for a shard set.

    vssl-inspect-shards /shards/k400/manifest.json --sheet k400.png --clips 16 --frames 6
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from collections import Counter

import numpy as np
from tqdm import tqdm
from webdataset.tariterators import tarfile_samples

from ..data.decode import DecodeError, decode
from ..data.shards import load_manifest, resolve_shards
from ..data.sources import IMAGE_EXTS, VIDEO_EXTS
from ..cli import HelpFormatter

VIDEO_KEYS = tuple(e.lstrip(".") for e in sorted(VIDEO_EXTS))
IMAGE_KEYS = tuple(e.lstrip(".") for e in sorted(IMAGE_EXTS))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="vssl-inspect-shards", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("shards", help="manifest.json, brace pattern or ;-joined URLs")
    p.add_argument("--sheet", default="", help="write a contact sheet PNG here")
    p.add_argument("--clips", type=int, default=12, help="samples on the contact sheet (one row each)")
    p.add_argument("--frames", type=int, default=6, help="frames per row")
    p.add_argument("--thumb", type=int, default=96, help="thumbnail height in pixels")
    p.add_argument("--max-samples", type=int, default=0, help="read at most this many samples (0 = all)")
    p.add_argument("--against", default="", help="another split's shards (e.g. val vs train): warn about source "
                   "videos found in both (leakage: segments of one video in train and test)")
    return p.parse_args(argv)


def sources_of(spec: str) -> dict[str, int]:
    """Source video path → samples of a shard set (from each sample's JSON)."""
    counts: Counter = Counter()
    for raw in tarfile_samples([{"url": s.url} for s in resolve_shards(spec)], handler=lambda exn: True):
        if "json" in raw:
            source = json.loads(raw["json"]).get("source")
            if source:
                counts[source] += 1
    return counts


def _summary(values) -> str:
    if not values:
        return "-"
    v = np.asarray(values, dtype=float)
    return f"min {v.min():.4g}  median {np.median(v):.4g}  mean {v.mean():.4g}  max {v.max():.4g}"


def frames_of(sample: dict, count: int) -> tuple[np.ndarray, str]:
    """`count` evenly spaced frames of a video sample, or the image of an image sample.  # [K,H,W,C] uint8"""
    for k in VIDEO_KEYS:
        if k in sample:
            _, frames, _ = decode(sample[k], lambda n: np.linspace(0, n - 1, min(count, n)).round().astype(int))
            return frames, "video"
    for k in IMAGE_KEYS:
        if k in sample:
            from PIL import Image

            return np.asarray(Image.open(io.BytesIO(sample[k])).convert("RGB"))[None], "image"
    raise DecodeError(f"no video or image member (members: {sorted(k for k in sample if not k.startswith('__'))})")


def contact_sheet(rows: list[tuple[str, np.ndarray]], frames: int, thumb: int):
    """One row per sample: its caption, then its frames as thumbnails of height `thumb`."""
    from PIL import Image, ImageDraw

    def fit(a):
        img = Image.fromarray(a)
        return img.resize((max(1, round(img.width * thumb / img.height)), thumb), Image.BILINEAR)

    thumbs = [(cap, [fit(f) for f in fr]) for cap, fr in rows]
    cell = max((t.width for _, ts in thumbs for t in ts), default=thumb)
    caption_w = 220
    sheet = Image.new("RGB", (caption_w + frames * (cell + 4), len(rows) * (thumb + 4) + 4), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for r, (cap, ts) in enumerate(thumbs):
        y = 4 + r * (thumb + 4)
        draw.text((6, y + 4), cap, fill=(230, 230, 230))
        for c, t in enumerate(ts):
            sheet.paste(t, (caption_w + c * (cell + 4), y))
    return sheet


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        shards = resolve_shards(args.shards)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    classes = load_manifest(args.shards).get("classes", []) if args.shards.endswith(".json") else []
    errors: list[str] = []
    per_shard, labels, kinds = Counter(), Counter(), Counter()
    stats: dict[str, list] = {"frames": [], "fps": [], "duration": [], "height": [], "width": [], "bytes": []}
    picked: list[dict] = []
    seen = 0

    def on_error(exn):
        errors.append(f"unreadable shard data: {exn}")
        return True

    total = sum(s.samples for s in shards) if all(s.samples >= 0 for s in shards) else None
    rng = np.random.default_rng(0)  # reservoir sampling: sheet rows spread over the whole set
    for raw in tqdm(tarfile_samples([{"url": s.url} for s in shards], handler=on_error), total=total,
                    desc="reading", unit="samples"):
        seen += 1
        per_shard[raw.get("__url__", "?")] += 1
        meta = json.loads(raw["json"]) if "json" in raw else {}
        labels[meta.get("class") or str(meta.get("label", "?"))] += 1
        media = [k for k in (*VIDEO_KEYS, *IMAGE_KEYS) if k in raw]
        kinds[media[0] if media else "none"] += 1
        stats["bytes"].append(sum(len(raw[k]) for k in media))
        for k in ("frames", "fps", "duration"):
            if k in meta:
                stats[k].append(meta[k])
        if "size" in meta:
            stats["height"].append(meta["size"][0])
            stats["width"].append(meta["size"][1])
        if args.sheet and len(picked) < args.clips:
            picked.append((seen, raw))
        elif args.sheet and (j := int(rng.integers(seen))) < args.clips:
            picked[j] = (seen, raw)
        if args.max_samples and seen >= args.max_samples:
            break

    print(f"\n{seen} samples in {len(per_shard)} of {len(shards)} shards; members: {dict(kinds)}")
    if classes:
        print(f"{len(classes)} classes in the manifest")
    print("per shard: " + _summary(list(per_shard.values())))
    for k, v in stats.items():
        if v:
            print(f"{k:>9}: {_summary(v)}")
    print("labels:   " + ", ".join(f"{k}={v}" for k, v in labels.most_common(20))
          + (f" … ({len(labels)} in all)" if len(labels) > 20 else ""))
    if args.sheet:
        rows = []
        for _, raw in sorted(picked, key=lambda p: p[0]):
            try:
                frames, _ = frames_of(raw, args.frames)
            except (DecodeError, OSError) as e:
                errors.append(f"{raw['__key__']} in {raw.get('__url__')}: {e}")
                continue
            meta = json.loads(raw["json"]) if "json" in raw else {}
            rows.append((f"{raw['__key__'][:28]}\n{meta.get('class', '')}", frames))
        if rows:
            contact_sheet(rows, args.frames, args.thumb).save(args.sheet)
            print(f"contact sheet ({len(rows)} samples): {args.sheet}")
    if args.against:
        ours, theirs = sources_of(args.shards), sources_of(args.against)
        shared = sorted(set(ours) & set(theirs))
        if shared:
            errors.append(f"{len(shared)} source videos appear in both {args.shards} and {args.against} "
                          f"({sum(ours[s] for s in shared)} + {sum(theirs[s] for s in shared)} samples; first: "
                          f"{shared[0]}): segments of one video in two splits leak; split by video "
                          "(make_shards --split-csv)")
        else:
            print(f"no source video shared with {args.against} ({len(ours)} vs {len(theirs)} sources)")
    for e in errors:
        print(f"warning: {e}", file=sys.stderr)
    return 0 if seen else 1


if __name__ == "__main__":
    sys.exit(main())
