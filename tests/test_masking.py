import math

import numpy as np
import pytest

from vssl_ds.data.masking import random_mask, tube_mask
from vssl_ds.data.sampling import ShortVideo, strided_clip


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_tube_mask_ratio_shape_and_tubes(ratio):
    m = tube_mask((8, 14, 14), ratio, np.random.default_rng(0))
    assert m.shape == (8 * 14 * 14,) and m.dtype == bool
    assert m.sum() == 8 * round(ratio * 196)
    slots = m.reshape(8, 196)
    assert (slots == slots[0]).all()  # the same spatial mask on every temporal slot


def test_random_mask_is_exact_and_varies():
    a, b = (random_mask(1568, 0.9, np.random.default_rng(s)) for s in (0, 1))
    assert a.sum() == b.sum() == round(0.9 * 1568) and (a != b).any()


def test_strided_clip_policies():
    rng = np.random.default_rng(0)
    idx = strided_clip(100, 16, 4, rng)
    assert len(idx) == 16 and (np.diff(idx) == 4).all() and idx[-1] < 100
    assert list(strided_clip(10, 4, 4, rng, "loop")) == [0, 4, 8, 2]
    assert list(strided_clip(10, 4, 4, rng, "pad")) == [0, 4, 8, 9]
    with pytest.raises(ShortVideo):
        strided_clip(10, 4, 4, rng, "skip")


def test_block_mask_follows_beit():
    from vssl_ds.data.masking import image_block_mask

    counts = [image_block_mask((14, 14), 0.5, np.random.default_rng(s)).sum() for s in range(50)]
    assert max(counts) <= 98 and np.mean(counts) > 85  # up to 98 of 196, a little short at times (as BEiT)
    m = image_block_mask((14, 14), 0.5, np.random.default_rng(0)).reshape(14, 14)
    # blocks, not scattered patches: most hidden patches have a hidden 4-neighbour
    nb = np.zeros_like(m)
    nb[1:] |= m[:-1]; nb[:-1] |= m[1:]; nb[:, 1:] |= m[:, :-1]; nb[:, :-1] |= m[:, 1:]  # noqa: E702
    assert (m & nb).sum() >= 0.9 * m.sum()


def test_block_tube_mask_repeats_one_block_mask_over_a_wrapping_run():
    from vssl_ds.data.masking import block_tube_mask

    for s in range(20):
        m = block_tube_mask((8, 14, 14), 0.5, np.random.default_rng(s)).reshape(8, 14, 14)
        on = [t for t in range(8) if m[t].any()]
        assert 4 <= len(on) <= 8
        assert all((m[t] == m[on[0]]).all() for t in on)  # the same 2D mask on every masked slot
        run = sorted(((t - on[0]) % 8 for t in on))  # contiguous modulo 8 from some start
        starts = [t for t in on if (t - 1) % 8 not in on]
        assert len(starts) <= 1 and len(run) == len(on)


def test_long_short_and_frame_pair_samplers():
    from vssl_ds.data.sampling import frame_pair, long_short_pair

    rng = np.random.default_rng(0)
    short, long = long_short_pair(300, 8, 2, 8, rng)
    assert len(short) == len(long) == 8 and np.all(np.diff(short) == 2) and np.all(np.diff(long) == 8)
    for _ in range(50):  # the short clip lies inside the long clip's span
        short, long = long_short_pair(300, 8, 2, 8, rng)
        assert long[0] <= short[0] and short[-1] <= long[-1]
    for _ in range(50):
        a, b = frame_pair(100, 10, rng)
        assert 0 <= a <= b < 100 and b - a <= 10
    assert list(frame_pair(1, 10, rng)) == [0, 0]  # an image gives itself twice


def _beit_reference(h, w, n, rnd, min_block=16):
    """BEiT's / BEVT's MaskingGenerator written out independently (python's random): the number masked."""
    mask, count, log_ar = np.zeros((h, w), dtype=bool), 0, (math.log(0.3), math.log(1 / 0.3))
    while count < n:
        budget, delta = n - count, 0
        for _ in range(10):
            area, ar = rnd.uniform(min_block, budget), math.exp(rnd.uniform(*log_ar))
            bh, bw = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
            if bw < w and bh < h:
                top, left = rnd.randint(0, h - bh), rnd.randint(0, w - bw)
                new = bh * bw - int(mask[top:top + bh, left:left + bw].sum())
                if 0 < new <= budget:
                    mask[top:top + bh, left:left + bw] = True
                    delta = new
                    break
        if delta == 0:
            break
        count += delta
    return count


def test_block_masks_reach_the_budget_as_often_as_beits():
    """When fewer than min_block cells remain, BEiT draws the area in U(budget, 16): the last blocks are small
    enough to fit, so 98 of 196 cells are reached as often as the official generator reaches them."""
    import random

    from vssl_ds.data.masking import block_mask_2d

    rng, rnd = np.random.default_rng(0), random.Random(0)
    ours = np.mean([block_mask_2d(14, 14, 98, rng).sum() == 98 for _ in range(2000)])
    official = np.mean([_beit_reference(14, 14, 98, rnd) == 98 for _ in range(2000)])
    assert abs(ours - official) < 0.06, (ours, official)
