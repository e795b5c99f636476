"""Turning one source file into one shard sample (bytes + metadata). Runs in make_shards' workers.

Videos are re-encoded with PyAV/libx264 (short side, fps, duration, keyframe interval) or copied
unchanged after a probe; images are re-encoded to JPEG or copied. Any failure raises `SourceError`
with a message meant for the failure report.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from .sources import Item


class SourceError(Exception):
    """The input is unreadable, corrupt or empty."""


@dataclass(frozen=True)
class EncodeOptions:
    copy: bool = False  # store the original bytes (after a probe) instead of re-encoding
    short_side: int = 320  # 0 = keep; never upscales
    fps: float = 0.0  # 0 = keep the source rate
    max_duration: float = 0.0  # seconds, 0 = whole video
    gop: int = 16  # keyframe interval: short → cheap random access for the samplers
    crf: int = 23
    preset: str = "veryfast"
    bframes: int = -1  # B-frames between references; -1 = the preset's (veryfast: 3); 0 = none (decodes in order)
    tune: str = ""  # x264 --tune, e.g. "fastdecode" (no CABAC, no deblocking, no weighted prediction)
    jpeg_quality: int = 90


def _even_size(h: int, w: int, short_side: int) -> tuple[int, int]:
    if short_side and min(h, w) > short_side:
        scale = short_side / min(h, w)
        h, w = round(h * scale), round(w * scale)
    return h - h % 2, w - w % 2  # yuv420p needs even sides


def x264_options(opt: EncodeOptions) -> dict[str, str]:
    options = {"crf": str(opt.crf), "g": str(opt.gop), "preset": opt.preset}
    if opt.bframes >= 0:
        options["bf"] = str(opt.bframes)
    if opt.tune:
        options["tune"] = opt.tune
    return options


def reencode_video(item: Item, opt: EncodeOptions) -> tuple[bytes, dict]:
    import av
    from av.video.reformatter import VideoReformatter

    from .decode import reformat_single_threaded

    try:
        with av.open(item.path) as src:
            if not src.streams.video:
                raise SourceError("no video stream")
            stream = src.streams.video[0]
            stream.thread_type = "AUTO"
            rate = float(stream.average_rate or stream.guessed_rate or 25)
            out_rate = Fraction(opt.fps).limit_denominator(1001) if opt.fps else Fraction(rate).limit_denominator(1001)
            if item.start > 0:
                src.seek(int(item.start / stream.time_base), stream=stream, backward=True, any_frame=False)
            stop = item.end or float("inf")
            if opt.max_duration:
                stop = min(stop, item.start + opt.max_duration)
            buf, count, next_t, size = io.BytesIO(), 0, item.start, None
            scaler = VideoReformatter()  # one scaler for the video, one thread (parallelism is make_shards' workers):
            # frame.reformat() would set up a new one, with a machine-sized thread pool, for every frame
            with av.open(buf, mode="w", format="mp4") as dst:
                out = None
                for frame in src.decode(stream):
                    t = float(frame.time) if frame.time is not None else count / rate
                    if t < item.start - 1e-6:
                        continue  # decoded from the keyframe before `start`
                    if t >= stop:
                        break
                    if t + 1e-6 < next_t:
                        continue  # dropped to reach the output rate
                    next_t = (next_t if next_t > 0 else t) + 1 / float(out_rate)
                    if out is None:
                        size = _even_size(frame.height, frame.width, opt.short_side)
                        out = dst.add_stream("libx264", rate=out_rate)
                        out.height, out.width = size
                        out.pix_fmt = "yuv420p"
                        out.options = x264_options(opt)
                    img = reformat_single_threaded(scaler, frame, width=size[1], height=size[0], format="yuv420p")
                    img.pts, img.time_base = count, 1 / out_rate  # frame counter: monotonic timestamps for the muxer
                    dst.mux(out.encode(img))
                    count += 1
                if out is None:
                    raise SourceError("no decodable frames" + (f" in [{item.start}, {stop}) s" if item.start or item.end else ""))
                dst.mux(out.encode())
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise SourceError(f"{type(e).__name__}: {e}") from None
    meta = {"fps": float(out_rate), "frames": count, "size": list(size), "duration": count / float(out_rate)}
    if item.end:  # a trimmed segment: how many frames its span should give at the output rate (a variable-frame-
        meta["frames_expected"] = round((stop - item.start) * float(out_rate))  # rate source gives far fewer)
    return buf.getvalue(), meta


def probe_video(data: bytes, origin: str) -> dict:
    """Counts the frames by decoding them all, so a corrupt file is caught here and not in training."""
    import av

    try:
        with av.open(io.BytesIO(data)) as c:
            if not c.streams.video:
                raise SourceError("no video stream")
            s = c.streams.video[0]
            rate = float(s.average_rate or s.guessed_rate or 0)
            count = sum(1 for _ in c.decode(s))
            h, w = s.codec_context.height, s.codec_context.width
    except (av.error.FFmpegError, ValueError) as e:
        raise SourceError(f"{origin}: {type(e).__name__}: {e}") from None
    if count == 0:
        raise SourceError(f"{origin}: no decodable frames")
    return {"fps": rate, "frames": count, "size": [h, w], "duration": count / rate if rate else 0.0}


def encode_image(item: Item, opt: EncodeOptions) -> tuple[bytes, dict, str]:
    from PIL import Image, UnidentifiedImageError

    try:
        raw = Path(item.path).read_bytes()
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            if opt.copy:
                ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}.get(img.format or "", None)
                if ext is None:
                    raise SourceError(f"copy mode keeps jpg/png/webp/bmp only, this is {img.format}")
                return raw, {"size": [img.height, img.width]}, ext
            img = img.convert("RGB")
            h, w = img.height, img.width
            if opt.short_side and min(h, w) > opt.short_side:
                s = opt.short_side / min(h, w)
                img = img.resize((round(w * s), round(h * s)), Image.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=opt.jpeg_quality)
            return buf.getvalue(), {"size": [img.height, img.width]}, "jpg"
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise SourceError(f"{type(e).__name__}: {e}") from None


def make_sample(item: Item, kind: str, opt: EncodeOptions, classes: list[str]) -> dict:
    """→ a webdataset sample {__key__, <ext>: bytes, json: meta}; raises SourceError."""
    meta = {"label": item.label, "class": classes[item.label] if 0 <= item.label < len(classes) else "",
            "source": item.path}
    if kind == "image":
        data, info, ext = encode_image(item, opt)
    elif opt.copy:
        try:
            data = Path(item.path).read_bytes()
        except OSError as e:
            raise SourceError(f"{type(e).__name__}: {e}") from None
        info, ext = probe_video(data, item.path), Path(item.path).suffix.lower().lstrip(".")
    else:
        (data, info), ext = reencode_video(item, opt), "mp4"
    if item.start or item.end:
        meta.update(start=item.start, end=item.end)
    import json

    return {"__key__": item.key, ext: data, "json": json.dumps({**meta, **info}).encode()}
