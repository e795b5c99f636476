"""Video decoding from in-memory bytes (shard members). PyAV is the default: it seeks to keyframes and skips the
frames nobody references, and measures fastest per core on make_shards output (docs/BENCHMARKS.md). decord is its
fallback (and an option of its own; it cannot read some frame widths, e.g. 48 px); torchcodec is used when
installed and asked for. All three return the same frames (tests)."""
from __future__ import annotations

import io
import threading
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


_local = threading.local()


def _rgb(frame) -> np.ndarray:
    """A decoded frame as RGB [H,W,C] uint8. One converter per thread, single-threaded, reused from frame to frame:
    `frame.to_ndarray(format="rgb24")` sets up a new scaler for every frame (with a thread pool the size of the
    machine), which cost 2.4x the conversion itself per core (measured on make_shards output; same pixels)."""
    converter = getattr(_local, "rgb", None)
    if converter is None:
        from av.video.reformatter import VideoReformatter

        converter = _local.rgb = VideoReformatter()
    return reformat_single_threaded(converter, frame, format="rgb24").to_ndarray()


def reformat_single_threaded(converter, frame, **kwargs):
    """`converter.reformat(frame, **kwargs)` on one thread. PyAV >= 17 scales with a thread pool the size of the
    machine unless told `threads=1`; older PyAV has no `threads` argument and scales on one thread anyway."""
    try:
        return converter.reformat(frame, threads=1, **kwargs)
    except TypeError:
        return converter.reformat(frame, **kwargs)


def decode_pyav(data: bytes, pick: Pick, stats: dict | None = None,
                skip: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """PyAV, one codec thread, seeking to the keyframe before each run of wanted frames (frames are found by
    their presentation timestamps, read from the packets without decoding). Between wanted frames the codec
    skips the frames that no other frame references (`skip`: FFmpeg's skip_frame=NONREF, set per packet; with
    the B-frames that make_shards writes by default, a quarter fewer frames decoded for 16 frames at stride 4,
    and the wanted frames are bit-identical, tested). A stream whose timestamps are missing or repeated is decoded
    sequentially instead, every frame. `stats["decoded"]` (if given) counts the frames the codec returned, wanted
    or not. → (indices [T], frames [T,H,W,C] uint8)"""
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
            wanted = [pts[i] for i in sorted(set(indices.tolist()))]
            kept = _pyav_seeking(container, stream, wanted, keys, stats, skip)
            missing = [int(i) for i in indices if pts[i] not in kept]
            if missing:  # a decoder delay or an open GOP hid a frame from the seek: take the sure way, with the
                return _pyav_sequential(container, lambda n: indices, stats)  # same indices (pick draws once)
            return indices, np.stack([kept[pts[i]] for i in indices])
    except (av.error.FFmpegError, IndexError, ValueError) as e:
        raise DecodeError(f"pyav: {e}") from None


def _pyav_seeking(container, stream, wanted: list[int], keys: list[int], stats=None,
                  skip: bool = True) -> dict[int, np.ndarray]:
    """{pts: frame} of the `wanted` timestamps (ascending). A seek to the keyframe before a target that lies behind
    the decoder or in a later keyframe interval; except, in a stream with B-frames (when `skip`), for a target in
    the next interval: that one is decoded on to (going on costs only the reference frames between, while a seek
    would decode again the keyframe that the decoder, a few frames ahead of its output, has often decoded already).
    """
    import bisect

    want, kept, frames, last = set(wanted), {}, None, None  # last: newest pts decoded since the last seek
    for target in wanted:
        if target in kept:
            continue
        key = keys[bisect.bisect_right(keys, target) - 1]  # the keyframe at or before the target
        if last is not None and skip and getattr(stream.codec_context, "has_b_frames", False):
            after = bisect.bisect_right(keys, last)  # the first keyframe after the newest frame decoded
            ahead = after < len(keys) and key > keys[after]
        else:
            ahead = last is not None and key > last
        if frames is None or last is None or target < last or ahead:
            container.seek(key, stream=stream, backward=True, any_frame=False)
            frames, last = _decode_packets(container, stream, want if skip else None), None
        for frame in frames:
            if stats is not None:
                stats["decoded"] = stats.get("decoded", 0) + 1
            if frame.pts is None:
                break
            last = frame.pts
            if frame.pts in want:
                kept[frame.pts] = _rgb(frame)
            if frame.pts >= target:
                break
    return kept


def _decode_packets(container, stream, want: set | None):
    """The frames decoded from the packets that follow the last seek. With `want` (timestamps): a packet whose
    frame is not wanted is decoded with skip_frame=NONREF, so a frame that nothing references is not decoded
    (a reference frame always is: the wanted frames decode exactly as without skipping). The codec runs one
    thread, so each packet is decoded inside its own `decode` call, under the setting made for it."""
    codec = stream.codec_context
    for packet in container.demux(stream):
        if want is not None and packet.pts is not None:  # the end-of-stream flush packet has no timestamp
            try:
                codec.skip_frame = "DEFAULT" if packet.pts in want else "NONREF"
            except (AttributeError, TypeError, ValueError):  # a PyAV that cannot set it: decode every frame
                want = None
        yield from codec.decode(packet)


def _pyav_sequential(container, pick: Pick, stats=None) -> tuple[np.ndarray, np.ndarray]:
    """Decode from the start up to the last wanted frame (a stream without usable timestamps)."""
    container.seek(0)
    stream = container.streams.video[0]
    stream.codec_context.skip_frame = "DEFAULT"  # frames are counted here: none may be skipped (a seeking try may
    # have left NONREF set)
    count = stream.frames
    if count <= 0:  # no frame count in the header: decode everything once
        frames = [_rgb(f) for f in container.decode(stream)]
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
            kept[i] = _rgb(frame)
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
DEFAULT_ORDER = ("pyav", "decord")  # data.decoder's default first, then its fallback


def decoder_order(first: str) -> tuple[str, ...]:
    """The configured decoder, then the others as fallbacks (a fallback is counted, see the pipeline)."""
    if first not in DECODERS:
        raise ValueError(f"data.decoder '{first}' is not one of {sorted(DECODERS)}")
    return (first, *[d for d in DEFAULT_ORDER if d != first])


def decoder_version(name: str) -> str:
    """The installed version of a decoder's package (recorded with cached targets)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version({"pyav": "av"}.get(name, name))
    except PackageNotFoundError:
        return "not installed"


def decode(data: bytes, pick: Pick, order=DEFAULT_ORDER) -> tuple[np.ndarray, np.ndarray, str]:
    """Try the decoders in order; → (indices, frames, name of the decoder that succeeded)."""
    errors = []
    for name in order:
        try:
            return (*DECODERS[name](data, pick), name)
        except DecodeError as e:
            errors.append(str(e))
    raise DecodeError("; ".join(errors))
