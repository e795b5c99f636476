"""Video decoding from in-memory bytes (shard members). decord is the default; PyAV is the fallback
for the clips decord cannot read (it fails on some frame widths, e.g. 48 px) and an option of its own;
torchcodec is used when installed and asked for. All three return the same frames (tests)."""
from __future__ import annotations

import io
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    import torch

Pick = Callable[[int], np.ndarray]  # number of frames in the video → frame indices to decode


class DecodeError(Exception):
    """The bytes are not a decodable video (corrupt, truncated, unknown codec)."""


def decode_decord(data: bytes, pick: Pick) -> tuple[np.ndarray, np.ndarray]:
    """→ (indices [T], frames [T,H,W,C] uint8)"""
    import decord

    try:
        reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
        indices = np.asarray(pick(len(reader)), dtype=np.int64)
        frames = reader.get_batch(indices.tolist()).asnumpy()
    except (decord.DECORDError, RuntimeError) as e:  # decord reports bad input as RuntimeError too
        raise DecodeError(f"decord: {str(e).splitlines()[0][:200]}") from None
    return indices, frames


def decode_pyav(data: bytes, pick: Pick, stats: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """PyAV, one codec thread, seeking to the keyframe before each run of wanted frames (frames are found by
    their presentation timestamps, read from the packets without decoding). A stream whose timestamps are
    missing or repeated is decoded sequentially instead. `stats["decoded"]` (if given) counts the frames the
    codec decoded, wanted or not. → (indices [T], frames [T,H,W,C] uint8)"""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1  # per core, one thread is fastest; parallelism is the workers'
            packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.size]
            pts = sorted(p for p, _ in packets if p is not None)
            if not pts or len(pts) != len(packets) or len(set(pts)) != len(pts):
                return _pyav_sequential(container, pick, stats)
            indices = np.asarray(pick(len(pts)), dtype=np.int64)
            keys = sorted(p for p, key in packets if key)
            if not keys or keys[0] != pts[0]:
                return _pyav_sequential(container, pick, stats)
            kept = _pyav_seeking(container, stream, [pts[i] for i in sorted(set(indices.tolist()))], keys, stats)
            missing = [int(i) for i in indices if pts[i] not in kept]
            if missing:  # a decoder delay or an open GOP hid a frame from the seek: take the sure way, with the
                return _pyav_sequential(container, lambda n: indices, stats)  # same indices (pick draws once)
            return indices, np.stack([kept[pts[i]] for i in indices])
    except (av.error.FFmpegError, IndexError, ValueError) as e:
        raise DecodeError(f"pyav: {e}") from None


def _pyav_seeking(container, stream, wanted: list[int], keys: list[int], stats=None) -> dict[int, np.ndarray]:
    """{pts: frame} of the `wanted` timestamps (ascending): one seek per keyframe interval that holds some."""
    import bisect

    want, kept, frames, last = set(wanted), {}, None, None  # last: newest pts decoded since the last seek
    for target in wanted:
        if target in kept:
            continue
        key = keys[bisect.bisect_right(keys, target) - 1]  # the keyframe at or before the target
        if frames is None or last is None or target < last or key > last:  # behind us, or a GOP or more ahead
            container.seek(key, stream=stream, backward=True, any_frame=False)
            frames, last = container.decode(stream), None
        for frame in frames:
            if stats is not None:
                stats["decoded"] = stats.get("decoded", 0) + 1
            if frame.pts is None:
                break
            last = frame.pts
            if frame.pts in want:
                kept[frame.pts] = frame.to_ndarray(format="rgb24")
            if frame.pts >= target:
                break
    return kept


def _pyav_sequential(container, pick: Pick, stats=None) -> tuple[np.ndarray, np.ndarray]:
    """Decode from the start up to the last wanted frame (a stream without usable timestamps)."""
    container.seek(0)
    stream = container.streams.video[0]
    count = stream.frames
    if count <= 0:  # no frame count in the header: decode everything once
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        if stats is not None:
            stats["decoded"] = stats.get("decoded", 0) + len(frames)
        if not frames:
            _empty()
        indices = np.asarray(pick(len(frames)), dtype=np.int64)
        return indices, np.stack([frames[i] for i in indices])
    indices = np.asarray(pick(count), dtype=np.int64)
    wanted, last, kept = set(indices.tolist()), int(indices.max()), {}
    for i, frame in enumerate(container.decode(stream)):
        if stats is not None:
            stats["decoded"] = stats.get("decoded", 0) + 1
        if i in wanted:
            kept[i] = frame.to_ndarray(format="rgb24")
        if i >= last:
            break
    missing = wanted - kept.keys()
    if missing:  # header over-counted (truncated file): treat like a corrupt clip
        raise DecodeError(f"pyav: frames {sorted(missing)[:4]} missing of {count} announced")
    return indices, np.stack([kept[i] for i in indices])


def torchcodec_decoder():
    """torchcodec's VideoDecoder class, or DecodeError saying why it cannot be imported (the wheel loads the system's
    FFmpeg libraries at import time)."""
    try:
        from torchcodec.decoders import VideoDecoder
    except (ImportError, OSError, RuntimeError) as e:
        raise DecodeError(f"torchcodec unavailable: {str(e).splitlines()[0][:200]}") from None
    return VideoDecoder


def decode_torchcodec(data: bytes, pick: Pick) -> tuple[np.ndarray, np.ndarray]:
    """torchcodec (optional extra `codec`; needs the system FFmpeg libraries). → (indices [T], frames [T,H,W,C])"""
    VideoDecoder = torchcodec_decoder()
    try:
        decoder = VideoDecoder(data, dimension_order="NHWC", seek_mode="exact")
        indices = np.asarray(pick(decoder.metadata.num_frames), dtype=np.int64)
        frames = decoder.get_frames_at(indices=indices.tolist()).data.numpy()
    except (RuntimeError, ValueError, IndexError) as e:
        raise DecodeError(f"torchcodec: {str(e).splitlines()[0][:200]}") from None
    return indices, frames


def probe_layout(data: bytes) -> tuple[int, int, int]:
    """(frames, height, width) of a video from its packets, without decoding: what a data worker needs to draw the
    frames and crops of a clip that the device will decode (data.decode_device). The frame count is the one
    decode_pyav sees (one packet per frame)."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            frames = sum(1 for p in container.demux(stream) if p.size)
            height, width = stream.codec_context.height, stream.codec_context.width
    except (av.error.FFmpegError, IndexError, ValueError) as e:
        raise DecodeError(f"pyav probe: {e}") from None
    if not frames or not height or not width:
        _empty()
    return frames, height, width


def decode_torchcodec_on(data: bytes, indices, device) -> "torch.Tensor":
    """The frames `indices` of a video, decoded by torchcodec on `device` (NVDEC on a GPU). → [F,H,W,C] uint8 there"""
    VideoDecoder = torchcodec_decoder()
    try:
        decoder = VideoDecoder(data, device=str(device), dimension_order="NHWC", seek_mode="exact")
        return decoder.get_frames_at(indices=[int(i) for i in indices]).data
    except (RuntimeError, ValueError, IndexError) as e:
        raise DecodeError(f"torchcodec on {device}: {str(e).splitlines()[0][:200]}") from None


def decode_image(data: bytes, pick: Pick) -> tuple[np.ndarray, np.ndarray]:
    """An image is a one-frame video. → (indices [1], frames [1,H,W,C] uint8)"""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            frame = np.asarray(img.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DecodeError(f"image: {e}") from None
    indices = np.asarray(pick(1), dtype=np.int64)
    return indices, frame[None].repeat(len(indices), 0)


def _empty():
    raise DecodeError("no decodable video frames")


DECODERS = {"decord": decode_decord, "pyav": decode_pyav, "torchcodec": decode_torchcodec}


def decoder_order(first: str) -> tuple[str, ...]:
    """The configured decoder, then the others as fallbacks (a fallback is counted, see the pipeline)."""
    if first not in DECODERS:
        raise ValueError(f"data.decoder '{first}' is not one of {sorted(DECODERS)}")
    return (first, *[d for d in ("decord", "pyav") if d != first])


def decode(data: bytes, pick: Pick, order=("decord", "pyav")) -> tuple[np.ndarray, np.ndarray, str]:
    """Try the decoders in order; → (indices, frames, name of the decoder that succeeded)."""
    errors = []
    for name in order:
        try:
            return (*DECODERS[name](data, pick), name)
        except DecodeError as e:
            errors.append(str(e))
    raise DecodeError("; ".join(errors))
