"""The teacher-target cache: target shards aligned by key with the video shards, and their manifest.

A target shard has the video shard's name and, for each of its samples in the same order:
    key.views.json          {"views": [{"frames": [[...] per clip], "spatial": [{box,size,flip,...} per clip]}, ...],
                             "decoder": "pyav", "version": "18.1.0"}   (or {"error": "..."} when the clip failed)
    key.v{k}.{name}.npy     targets of view k (fp16 [N,D]; int8 [N,D] + key.v{k}.{name}_scale.npy fp16 [N,1];
                            uint16 [N] token ids; for iBoot, fp16 [T,D] frame embeddings of each clip)
The manifest fingerprints everything that defines the targets; a run whose teacher spec differs is refused.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..data.targets import decode_targets, encode_targets, npy_bytes, npy_load  # noqa: F401 (re-exported)

MANIFEST = "targets.json"


def file_digest(path: str) -> str:
    if not path:
        return ""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"teacher weights '{path}' do not exist")
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def mvd_fingerprint(cfg) -> dict:
    """Everything that decides MVD's cached targets (not the mask: masks stay fresh and online)."""
    c, d, m = cfg.method.mvd, cfg.data, cfg.model
    return {"method": "mvd", "image_teacher": c.image_teacher, "image_weights": file_digest(c.image_teacher_weights),
            "video_teacher": c.video_teacher, "video_weights": file_digest(c.video_teacher_weights),
            "layer": "last_block_no_final_norm", "norm_targets": c.norm_targets, "teacher_size": c.teacher_size,
            "size": d.size, "num_frames": d.num_frames, "sampling_rate": d.sampling_rate, "scales": list(d.scales),
            "view": d.view, "short_video": d.short_video, "tubelet": m.tubelet, "patch": m.patch,
            "seed": cfg.run.seed, "decoder": d.decoder}


def bevt_fingerprint(cfg) -> dict:
    """Everything that decides BEVT's cached token ids (video and image streams)."""
    c, d, m = cfg.method.bevt, cfg.data, cfg.model
    return {"method": "bevt", "tokenizer": c.tokenizer, "tokenizer_weights": file_digest(c.tokenizer_weights),
            "tokenizer_size": m.img_size // 2, "size": d.size, "num_frames": d.num_frames,
            "sampling_rate": d.sampling_rate, "view": d.view, "short_range": list(d.short_range),
            "short_video": d.short_video, "images": Path(d.images).name if d.images else "", "seed": cfg.run.seed,
            "decoder": d.decoder}


def iboot_fingerprint(cfg) -> dict:
    """Everything that decides iBoot's cached per-frame embeddings of both clips."""
    c, d = cfg.method.iboot, cfg.data
    return {"method": "iboot", "teacher": c.teacher, "teacher_weights": file_digest(c.teacher_weights),
            "teacher_pool": c.teacher_pool, "size": d.size, "num_frames": d.num_frames,
            "sampling_rate": d.sampling_rate, "long_stride": d.long_stride, "view": d.view,
            "short_video": d.short_video, "mean": list(d.mean), "std": list(d.std), "seed": cfg.run.seed,
            "decoder": d.decoder, "teacher_input": "renormalised to the teacher's own mean/std"}


def check_fingerprint(manifest: dict, expected: dict, where: str) -> None:
    got = manifest.get("fingerprint", {})
    diff = {k: (got.get(k), v) for k, v in expected.items() if got.get(k) != v}
    if diff:
        lines = "; ".join(f"{k}: cache {a!r} vs run {b!r}" for k, (a, b) in diff.items())
        hint = ""
        if "decoder" in diff and diff["decoder"][0]:  # the default decoder changed from decord to pyav (2026-12)
            hint = f" (for the decoder alone: set data.decoder={diff['decoder'][0]} to use this cache as it is)"
        raise ValueError(f"teacher cache {where} was made for another teacher spec ({lines}). Rebuild it with "
                         f"tools/cache_teachers.py for this config, or set the method's targets=online{hint}")


def load_manifest(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST
    if not p.is_file():
        raise FileNotFoundError(f"teacher cache manifest '{p}' does not exist: run tools/cache_teachers.py first")
    return json.loads(p.read_text())
