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
