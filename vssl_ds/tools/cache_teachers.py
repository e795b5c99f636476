"""Run the teachers once and cache their targets, K exact views per clip, next to the video shards.

    vssl-cache-teachers OUT --config mvd_vit_b --set data.train=/shards/k400/manifest.json \\
        --set method.mvd.image_teacher_weights=… --set method.mvd.video_teacher_weights=… --views 4
    vssl-cache-teachers OUT --config iboot_vit_b --set method.iboot.teacher_weights=dino.pth …     # iBoot
    torchrun --nproc_per_node 8 -m vssl_ds.tools.cache_teachers OUT --config …      # shards split over ranks
    vssl-cache-teachers OUT --config … --verify 16                                   # re-run teachers, compare

Then train with `--set method.<mvd|bevt|iboot>.targets=cache --set data.targets=OUT`. Each view is drawn with the run's own
view sampler and recorded (frame indices, crop box in decoded pixels, flip, size); training replays view
k = epoch mod K exactly and draws a fresh mask. Finished target shards are kept when the job is rerun.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from webdataset.tariterators import tarfile_samples

from ..config.loader import ConfigError, load_config
from ..data.build import view_from
from ..data.decode import DecodeError, decode, decoder_order
from ..data.sampling import ShortVideo
from ..data.shards import resolve_shards
from ..data.targets import decode_targets, encode_targets
from ..data.transforms import apply_view, normalize
from ..engine import dist
from ..teachers.cache import MANIFEST, bevt_fingerprint, iboot_fingerprint, mvd_fingerprint
from ..cli import HelpFormatter, console

JOBS = {"mvd": lambda cfg, device: Teachers(cfg, device), "bevt": lambda cfg, device: Tokenizer(cfg, device),
        "iboot": lambda cfg, device: FrameEmbeddings(cfg, device)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="vssl-cache-teachers", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("out", help="folder for the target shards and targets.json")
    p.add_argument("--config", required=True, help="the recipe of the student run (its teachers, views and data)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--views", type=int, default=2, help="views cached per clip (epoch e replays view e mod K)")
    p.add_argument("--dtype", choices=["fp16", "int8"], default="fp16", help="features (MVD); token ids are uint16")
    p.add_argument("--batch", type=int, default=16, help="clips per teacher forward")
    p.add_argument("--verify", type=int, default=0, help="re-run the teachers on N random cached views and compare")
    return p.parse_args(argv)


def _view_rng(seed: int, k: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, 7919, k, zlib.crc32(key.encode())])  # apart from training's streams


def draw_views(raw: dict, view, cfg, k_views: int):
    """K views of one sample (video, or image as a 1-frame clip), decoded once for all of them: (records, uint8
    clips [K,P,T,H,W,C]) with P the clips of the view (1, or 2 for long_short); raises DecodeError / ShortVideo.
    View k draws its frames, then its crops, from its own generator (seed, k, key), as if drawn alone."""
    from ..data.decode import decode_image
    from ..data.pipeline import IMAGE_MEMBERS, MEDIA, _gather

    member = next((m for m in MEDIA if m in raw), None)
    if member is None:
        raise DecodeError(f"no video/image member (has {sorted(k for k in raw if not k.startswith('__'))})")
    rngs = [_view_rng(cfg.run.seed, k, raw["__key__"]) for k in range(k_views)]
    picked: list[list[np.ndarray]] = []  # per view, its clips' frame indices

    def pick(n: int) -> np.ndarray:  # drawn once: a fallback decoder must not draw other views
        if not picked:
            picked.extend(view.pick(n, rng) for rng in rngs)
        return np.unique(np.concatenate([idx for clips in picked for idx in clips]))  # every frame any view uses

    if member in IMAGE_MEMBERS:
        indices, frames = decode_image(raw[member], pick)
    else:
        indices, frames, _ = decode(raw[member], pick, decoder_order(cfg.data.decoder))
    row = {int(i): r for r, i in enumerate(indices)}
    frames = torch.from_numpy(frames)  # [F,H,W,C]: the distinct frames of all views
    records, clips = [], []
    for rng, chosen in zip(rngs, picked):
        spatial = view.spatial(frames.shape[1], frames.shape[2], rng)
        clips.append(torch.stack([apply_view(_gather(frames, [row[int(i)] for i in idx]), p)
                                  for idx, p in zip(chosen, spatial)]))
        records.append({"frames": [idx.tolist() for idx in chosen], "spatial": spatial})
    return records, torch.stack(clips)


class Teachers:
    """MVD's two teachers on a clip → {"img": [B,N,Di], "vid": [B,N,Dv]} float (bf16 autocast on GPU)."""

    names, dtypes = ("img", "vid"), ("fp16", "int8")

    def __init__(self, cfg, device):
        from ..methods.mvd import MVDTeachers

        self.cfg, self.device = cfg, device
        self.model = MVDTeachers(cfg).to(device).eval()  # fp32 weights, bf16 autocast on GPU (verify: vs fp32)
        self.autocast = device.type == "cuda"
        self.dims = self.model.dims
        m = cfg.model
        self.rows = (m.num_frames // m.tubelet) * (m.img_size // m.patch) ** 2  # target rows per view
        self.fingerprint = mvd_fingerprint(cfg)
        self.streams = [("", cfg.data.train, view_from(cfg.data))]

    @torch.no_grad()
    def __call__(self, clips: torch.Tensor) -> dict[str, torch.Tensor]:  # clips [B,1,T,H,W,C] uint8
        video = normalize(clips[:, 0].permute(0, 4, 1, 2, 3).to(self.device), self.cfg.data.mean, self.cfg.data.std)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return {k: v.float().cpu() for k, v in self.model(video).items()}


class Tokenizer:
    """BEVT's tokenizer on every frame (half size) → {"tok": [B,T*n] token ids}; videos and images."""

    names, dtypes = ("tok",), ("uint16",)

    def __init__(self, cfg, device):
        from ..teachers.tokenizers import build_tokenizer

        c = cfg.method.bevt
        self.cfg, self.device, self.size = cfg, device, cfg.model.img_size // 2
        self.model = build_tokenizer(c.tokenizer, c.tokenizer_weights).to(device)
        self.autocast = False  # token ids are argmaxes: the tokenizer runs in fp32
        self.dims = {"tok": 1}
        self.rows = cfg.model.num_frames * (cfg.model.img_size // 16) ** 2  # one id per 16-px cell of every frame
        self.vocab = self.model.vocab_size
        self.fingerprint = bevt_fingerprint(cfg)
        self.streams = [("", cfg.data.train, view_from(cfg.data))]
        if cfg.data.images:
            self.streams.append(("images", cfg.data.images, view_from(cfg.data, "image")))

    @torch.no_grad()
    def __call__(self, clips: torch.Tensor) -> dict[str, torch.Tensor]:  # clips [B,1,T,H,W,C] uint8
        clips = clips[:, 0]
        b, t = clips.shape[:2]
        pixels = clips.flatten(0, 1).permute(0, 3, 1, 2).to(self.device).float() / 255  # [B*T,3,H,W]
        pixels = torch.nn.functional.interpolate(pixels, size=self.size, mode="bilinear", align_corners=False,
                                                 antialias=True)
        return {"tok": self.model(pixels).reshape(b, -1).cpu()}


class FrameEmbeddings:
    """iBoot's frozen image model on every frame of both clips → {"emb_video": [B,T,D], "emb_long": [B,T,D]}."""

    names, dtypes = ("emb_video", "emb_long"), ("fp16",)

    def __init__(self, cfg, device):
        from ..methods.iboot import build_image_model

        self.cfg, self.device, self.pool = cfg, device, cfg.method.iboot.teacher_pool
        self.model = build_image_model(cfg).to(device).eval()
        self.autocast = device.type == "cuda"
        self.dims = {n: self.model.embed_dim for n in self.names}
        self.rows = cfg.model.num_frames
        self.fingerprint = iboot_fingerprint(cfg)
        self.streams = [("", cfg.data.train, view_from(cfg.data))]
        if self.streams[0][2].kind != "long_short":
            raise SystemExit(f"error: iBoot caches the two clips of data.view=long_short (got '{cfg.data.view}')")

    @torch.no_grad()
    def __call__(self, clips: torch.Tensor) -> dict[str, torch.Tensor]:  # clips [B,2,T,H,W,C] uint8
        from ..methods.iboot import frame_embeddings

        out = {}
        for i, name in enumerate(self.names):
            video = normalize(clips[:, i].permute(0, 4, 1, 2, 3).to(self.device), self.cfg.data.mean, self.cfg.data.std)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                out[name] = frame_embeddings(self.model, video, self.pool,
                                             (self.cfg.data.mean, self.cfg.data.std)).float().cpu()
        return out


def _estimate(cfg, shards, k_views: int, dims: dict, dtype: str, out: Path, tokens: int) -> int:
    per_value = 1 if dtype == "int8" else 2
    per_clip = k_views * sum(tokens * (d * per_value + (2 if dtype == "int8" else 0)) + 1024 for d in dims.values())
    counted = [s.samples for s in shards if s.samples >= 0]
    clips = sum(counted) if len(counted) == len(shards) else cfg.data.epoch_size
    need = per_clip * clips
    free = shutil.disk_usage(out).free
    print(f"estimate: {clips} clips x {k_views} views x {tokens} tokens x {sum(dims.values())} channels "
          f"({dtype}) ≈ {need / 2 ** 30:.2f} GiB; {free / 2 ** 30:.1f} GiB free at {out}", flush=True)
    if clips and need > free:
        raise SystemExit(f"error: the cache needs about {need / 2 ** 30:.1f} GiB but {out} has "
                         f"{free / 2 ** 30:.1f} GiB free; use --dtype int8, fewer --views, or another disk")
    return per_clip


def write_shard(url: str, dest: Path, cfg, teachers, view, k_views: int, dtype: str, batch: int, bar) -> None:
    """One target shard, aligned with the video shard `url`; written to a .tmp file and renamed when whole."""
    import webdataset as wds

    from ..data.decode import decoder_version

    tmp = dest.with_suffix(".tar.tmp")
    pending: list[tuple[str, list, torch.Tensor | None, str]] = []

    def flush(sink):
        good = [p for p in pending if p[2] is not None]
        outs = teachers(torch.cat([p[2] for p in good])) if good else {}
        row = 0
        for key, records, clips, error in pending:
            sample = {"__key__": key}
            if clips is None:
                sample["views.json"] = json.dumps({"error": error}).encode()
            else:
                sample["views.json"] = json.dumps({"views": records, "decoder": cfg.data.decoder,
                                                   "version": decoder_version(cfg.data.decoder)}).encode()
                for k in range(k_views):
                    for name in teachers.names:
                        sample.update(encode_targets(name, k, outs[name][row + k], dtype))
                row += k_views
            sink.write(sample)
        pending.clear()

    with wds.TarWriter(str(tmp), mtime=0) as sink:
        for raw in tarfile_samples([{"url": url}]):
            key = raw["__key__"]
            try:
                records, clips = draw_views(raw, view, cfg, k_views)
                pending.append((key, records, clips, ""))
            except (DecodeError, ShortVideo) as e:
                pending.append((key, [], None, str(e)))
            if sum(k_views for p in pending if p[2] is not None) >= batch:
                flush(sink)
            bar.update(1)
        flush(sink)
    tmp.replace(dest)


def _compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    if a.dtype == torch.int64:  # token ids: the fraction that agree
        return {"agree_min": (a == b).float().mean().item()}
    return {"cosine_min": torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item(),
            "rel_err_max": ((a - b).norm() / b.norm().clamp(min=1e-12)).item()}


def verify(out: Path, cfg, teachers, count: int, seed: int = 0) -> dict:
    """Recompute `count` random cached views from the media and compare with what the cache holds:
    min cosine and max relative error for features, min agreement for token ids; `vs_fp32_*` compares the
    cache with the same teachers run wholly in fp32 (what bf16 autocast and the storage dtype cost)."""
    rng = np.random.default_rng(seed)
    sub, spec, view = teachers.streams[0]
    shards = resolve_shards(spec)
    stats: dict[str, dict] = {}
    done = 0
    for shard in rng.permutation(len(shards)):
        url = shards[shard].url
        joined = zip(tarfile_samples([{"url": url}]), tarfile_samples([{"url": str(out / sub / Path(url).name)}]))
        for raw, entry in joined:
            meta = json.loads(entry["views.json"])
            if "error" in meta or rng.random() > 0.5:
                continue
            k = int(rng.integers(len(meta["views"])))
            _, clips = draw_views(raw, view, cfg, len(meta["views"]))
            fresh = teachers(clips[k:k + 1])
            low, teachers.autocast = teachers.autocast, False
            exact = teachers(clips[k:k + 1]) if low else fresh  # the same views in fp32: the precision's cost
            teachers.autocast = low
            for n in teachers.names:
                cached = decode_targets(entry, n, k)
                for tag, ref in (("", fresh[n][0]), ("vs_fp32_", exact[n][0])):
                    for key, v in _compare(cached, ref).items():
                        worst = max if key == "rel_err_max" else min
                        stats.setdefault(n, {})[tag + key] = worst(stats.get(n, {}).get(tag + key, v), v)
            done += 1
            if done >= count:
                return {"views": done, **stats}
    return {"views": done, **stats}


# what --verify accepts: features within bf16 + fp16-storage noise, token ids mostly unchanged by bf16 autocast
THRESHOLDS = {"cosine_min": (">=", 0.99), "rel_err_max": ("<=", 0.05), "agree_min": (">=", 0.90)}


def verdict(report: dict) -> tuple[str, list[str]]:
    """PASS when every recomputed view (and the fp32 run) is within THRESHOLDS of the cache → (verdict, lines)."""
    if report.get("views", 0) == 0:
        return "FAIL", ["FAIL: no cached view could be recomputed (empty or foreign cache?)"]
    lines, ok = [], True
    for name, stats in report.items():
        if not isinstance(stats, dict):
            continue
        for key, value in stats.items():
            op, limit = THRESHOLDS[key.removeprefix("vs_fp32_")]
            good = value >= limit if op == ">=" else value <= limit
            ok &= good
            lines.append(f"  {'ok  ' if good else 'FAIL'} {name} {key} = {value:.4g} (needs {op} {limit})")
    head = f"{'PASS' if ok else 'FAIL'}: {report['views']} cached views recomputed and compared"
    return ("PASS" if ok else "FAIL"), [head, *lines]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.method.name not in JOBS:
        print(f"error: caching is implemented for method.name in {sorted(JOBS)} (got {cfg.method.name})",
              file=sys.stderr)
        return 2
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teachers = JOBS[cfg.method.name](cfg, device)
    dtype = args.dtype if args.dtype in teachers.dtypes else teachers.dtypes[0]
    stamp = out / "fingerprint.json"
    if stamp.exists() and json.loads(stamp.read_text()) != teachers.fingerprint:
        raise SystemExit(f"error: {out} holds targets of another teacher spec ({stamp}); use a new folder")
    if rank == 0:
        stamp.write_text(json.dumps(teachers.fingerprint, indent=1))
    if args.verify:
        report = verify(out, cfg, teachers, args.verify)
        report["verdict"], lines = verdict(report)
        print(json.dumps(report, indent=1))  # stdout: the report alone, for scripts
        print("\n".join(lines), file=sys.stderr)
        return 0 if report["verdict"] == "PASS" else 1
    listing = {}
    for sub, spec, view in teachers.streams:  # videos (and, for BEVT, the image stream) into OUT[/images]
        shards = resolve_shards(spec)
        listing[sub or "videos"] = [Path(s.url).name for s in shards]
        dest = out / sub
        dest.mkdir(parents=True, exist_ok=True)
        per_clip = _estimate(cfg, shards, args.views, teachers.dims, dtype, dest, teachers.rows) if rank == 0 else 0
        todo = [s for s in shards[rank::world] if not (dest / Path(s.url).name).exists()]
        for stale in dest.glob("*.tar.tmp"):
            if any(stale.name.startswith(Path(s.url).name) for s in todo):
                stale.unlink()  # a shard being written when the job died: redone
        total = sum(max(s.samples, 0) for s in todo) or None
        with tqdm(total=total, desc=f"rank {rank} caching {sub or 'videos'}", unit="clips", disable=rank != 0) as bar:
            for s in todo:
                write_shard(s.url, dest / Path(s.url).name, cfg, teachers, view, args.views, dtype, args.batch, bar)
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        manifest = {"fingerprint": teachers.fingerprint, "dims": teachers.dims, "views": args.views, "dtype": dtype,
                    "names": list(teachers.names), "shards": listing, "bytes_per_clip_estimate": per_clip,
                    "vocab": getattr(teachers, "vocab", 0)}
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
        print(f"teacher targets in {out}\n  train with: --set method.{cfg.method.name}.targets=cache "
              f"--set data.targets={out}")
    dist.shutdown()
    return 0


# console scripts (pyproject.toml): main() run, then the process ended through engine.dist.leave
cli = console(main)

if __name__ == "__main__":
    cli()
