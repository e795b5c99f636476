"""Run the teachers once and cache their targets, K exact views per clip, next to the video shards.

    vssl-cache-teachers OUT --config mvd_vit_b --set data.train=/shards/k400/manifest.json \\
        --set method.mvd.image_teacher_weights=… --set method.mvd.video_teacher_weights=… --views 4
    torchrun --nproc_per_node 8 -m vssl_ds.tools.cache_teachers OUT --config …      # shards split over ranks
    vssl-cache-teachers OUT --config … --verify 16                                   # re-run teachers, compare

Then train with `--set method.mvd.targets=cache --set data.targets=OUT`. Each view is drawn with the run's own
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
from ..teachers.cache import MANIFEST, mvd_fingerprint

NAMES = ("img", "vid")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="vssl-cache-teachers", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder for the target shards and targets.json")
    p.add_argument("--config", required=True, help="the recipe of the student run (its teachers, views and data)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--views", type=int, default=2, help="views cached per clip (epoch e replays view e mod K)")
    p.add_argument("--dtype", choices=["fp16", "int8"], default="fp16")
    p.add_argument("--batch", type=int, default=16, help="clips per teacher forward")
    p.add_argument("--verify", type=int, default=0, help="re-run the teachers on N random cached views and compare")
    return p.parse_args(argv)


def _view_rng(seed: int, k: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, 7919, k, zlib.crc32(key.encode())])  # apart from training's streams


def draw_views(data: bytes, key: str, cfg, k_views: int):
    """K views of one clip: (records, uint8 clips [K,T,H,W,C]); raises DecodeError / ShortVideo."""
    view, d = view_from(cfg.data), cfg.data
    records, clips = [], []
    for k in range(k_views):
        rng = _view_rng(cfg.run.seed, k, key)
        picked: list[np.ndarray] = []

        def pick(n: int) -> np.ndarray:  # drawn once: a fallback decoder must not draw another view
            if not picked:
                picked.append(view.pick(n, rng)[0])
            return picked[0]

        _, frames, _ = decode(data, pick, decoder_order(d.decoder))
        spatial = view.spatial(frames.shape[1], frames.shape[2], rng)
        clips.append(apply_view(torch.from_numpy(frames), spatial[0]))
        records.append({"frames": [picked[0].tolist()], "spatial": spatial})
    return records, torch.stack(clips)


class Teachers:
    def __init__(self, cfg, device):
        from ..methods.mvd import MVDTeachers

        self.cfg, self.device = cfg, device
        self.model = MVDTeachers(cfg).to(device).eval()
        self.dims = self.model.dims

    @torch.no_grad()
    def __call__(self, clips: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 [B,T,H,W,C] → {"img": [B,N,Di], "vid": [B,N,Dv]} (bf16 autocast on GPU: reduced precision)"""
        video = normalize(clips.permute(0, 4, 1, 2, 3).to(self.device), self.cfg.data.mean, self.cfg.data.std)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return {k: v.float().cpu() for k, v in self.model(video).items()}


def _estimate(cfg, shards, k_views: int, dims: dict, dtype: str, out: Path) -> int:
    m = cfg.model
    tokens = (m.num_frames // m.tubelet) * (m.img_size // m.patch) ** 2
    per_value = 2 if dtype == "fp16" else 1
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


def write_shard(url: str, dest: Path, cfg, teachers: Teachers, k_views: int, dtype: str, batch: int, bar) -> None:
    """One target shard, aligned with the video shard `url`; written to a .tmp file and renamed when whole."""
    import decord
    import webdataset as wds

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
                                                   "version": decord.__version__}).encode()
                for k in range(k_views):
                    for name in NAMES:
                        sample.update(encode_targets(name, k, outs[name][row + k], dtype))
                row += k_views
            sink.write(sample)
        pending.clear()

    with wds.TarWriter(str(tmp), mtime=0) as sink:
        for raw in tarfile_samples([{"url": url}]):
            key = raw["__key__"]
            data = raw.get("mp4")
            try:
                if data is None:
                    raise DecodeError("no .mp4 member")
                records, clips = draw_views(data, key, cfg, k_views)
                pending.append((key, records, clips, ""))
            except (DecodeError, ShortVideo) as e:
                pending.append((key, [], None, str(e)))
            if sum(k_views for p in pending if p[2] is not None) >= batch:
                flush(sink)
            bar.update(1)
        flush(sink)
    tmp.replace(dest)


def verify(out: Path, cfg, teachers: Teachers, count: int, seed: int = 0) -> dict:
    """Recompute `count` random cached views from the videos and compare with what the cache holds."""
    rng = np.random.default_rng(seed)
    shards = resolve_shards(cfg.data.train)
    stats = {n: {"cosine_min": 1.0, "rel_err_max": 0.0} for n in NAMES}
    done = 0
    for shard in rng.permutation(len(shards)):
        url = shards[shard].url
        joined = zip(tarfile_samples([{"url": url}]), tarfile_samples([{"url": str(out / Path(url).name)}]))
        for raw, entry in joined:
            meta = json.loads(entry["views.json"])
            if "error" in meta or rng.random() > 0.5:
                continue
            k = int(rng.integers(len(meta["views"])))
            records, clips = draw_views(raw["mp4"], raw["__key__"], cfg, len(meta["views"]))
            fresh = teachers(clips[k:k + 1])
            for n in NAMES:
                a, b = decode_targets(entry, n, k), fresh[n][0]
                cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()
                rel = ((a - b).norm() / b.norm().clamp(min=1e-12)).item()
                stats[n]["cosine_min"] = min(stats[n]["cosine_min"], cos)
                stats[n]["rel_err_max"] = max(stats[n]["rel_err_max"], rel)
            done += 1
            if done >= count:
                return {"views": done, **stats}
    return {"views": done, **stats}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.method.name != "mvd":
        print(f"error: caching is implemented for method.name=mvd (got {cfg.method.name})", file=sys.stderr)
        return 2
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = mvd_fingerprint(cfg)
    stamp = out / "fingerprint.json"
    if stamp.exists() and json.loads(stamp.read_text()) != fingerprint:
        raise SystemExit(f"error: {out} holds targets of another teacher spec ({stamp}); use a new folder")
    if rank == 0:
        stamp.write_text(json.dumps(fingerprint, indent=1))
    teachers = Teachers(cfg, device)
    shards = resolve_shards(cfg.data.train)
    if args.verify:
        report = verify(out, cfg, teachers, args.verify)
        print(json.dumps(report, indent=1))
        return 0
    per_clip = _estimate(cfg, shards, args.views, teachers.dims, args.dtype, out) if rank == 0 else 0
    mine = shards[rank::world]
    todo = [s for s in mine if not (out / Path(s.url).name).exists()]
    for stale in out.glob("*.tar.tmp"):
        if any(stale.name.startswith(Path(s.url).name) for s in todo):
            stale.unlink()  # a shard being written when the job died: redone
    total = sum(max(s.samples, 0) for s in todo) or None
    with tqdm(total=total, desc=f"rank {rank} caching", unit="clips", disable=rank != 0) as bar:
        for s in todo:
            write_shard(s.url, out / Path(s.url).name, cfg, teachers, args.views, args.dtype, args.batch, bar)
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        manifest = {"fingerprint": fingerprint, "dims": teachers.dims, "views": args.views, "dtype": args.dtype,
                    "names": list(NAMES), "shards": [Path(s.url).name for s in shards],
                    "bytes_per_clip_estimate": per_clip}
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
        print(f"teacher targets for {len(shards)} shards in {out}\n  train with: --set method.mvd.targets=cache "
              f"--set data.targets={out}")
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
