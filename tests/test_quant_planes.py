"""Plane repacking (pack/unpack) and the jnp decoder vs the NumPy decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ds4jax.errors import DS4Error
from ds4jax.quant import QTensor, QType, decode_numpy, dequantize, dequantize_rows, pack, take, unpack
from ds4jax.quant.testing import random_raw

ALL = [QType.Q8_0, QType.Q2_K, QType.Q4_K, QType.IQ2_XXS, QType.F32, QType.F16, QType.BF16, QType.I32]
SHAPES = [(5, 768), (3, 2, 512)]

# Documented plane shapes/dtypes for a (*lead, n) tensor, nb = n // 256.
def expected_planes(q, lead, n):
    nb = n // 256
    return {
        QType.Q8_0: {"qs": ("int8", lead + (n,)), "d": ("float16", lead + (n // 32,))},
        QType.Q2_K: {"qs": ("uint8", lead + (nb, 64)), "sc": ("uint8", lead + (nb, 16)),
                     "d": ("float16", lead + (nb,)), "dmin": ("float16", lead + (nb,))},
        QType.Q4_K: {"qs": ("uint8", lead + (nb, 128)), "sc": ("uint8", lead + (nb, 8)),
                     "m": ("uint8", lead + (nb, 8)), "d": ("float16", lead + (nb,)),
                     "dmin": ("float16", lead + (nb,))},
        QType.IQ2_XXS: {"grid": ("uint8", lead + (nb, 32)), "aux": ("uint32", lead + (nb, 8)),
                        "d": ("float16", lead + (nb,))},
        QType.F32: {"w": ("float32", lead + (n,))},
        QType.F16: {"w": ("float16", lead + (n,))},
        QType.BF16: {"w": ("bfloat16", lead + (n,))},
        QType.I32: {"w": ("int32", lead + (n,))},
    }[q]


_deq = jax.jit(dequantize)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("q", ALL)
def test_pack_unpack_and_jnp_decode(q, shape):
    rng = np.random.default_rng(int(q) + 100 * len(shape))
    raw = random_raw(q, shape, rng)
    qt = pack(raw, q, shape)
    assert qt.qtype == int(q) and qt.shape == shape
    want_planes = expected_planes(q, shape[:-1], shape[-1])
    assert {k: (str(v.dtype), v.shape) for k, v in qt.planes.items()} == want_planes
    np.testing.assert_array_equal(unpack(qt), raw)
    # pack accepts flat bytes too.
    np.testing.assert_array_equal(unpack(pack(raw.reshape(-1), q, shape)), raw)

    want = decode_numpy(raw, q, shape[-1])
    got = np.asarray(_deq(qt))
    assert got.dtype == want.dtype and got.shape == shape
    np.testing.assert_array_equal(got, want)  # bit-exact


@pytest.mark.parametrize("q", [QType.Q8_0, QType.Q2_K, QType.Q4_K, QType.IQ2_XXS, QType.BF16])
def test_dequantize_rows(q):
    shape = (4, 3, 256)  # (expert, out, in)
    raw = random_raw(q, shape, np.random.default_rng(int(q)))
    qt = pack(raw, q, shape)
    full = decode_numpy(raw, q, 256)
    idx = np.array([[2, 0], [3, 2]], np.int32)
    got = jax.jit(dequantize_rows)(qt, jnp.asarray(idx))
    np.testing.assert_array_equal(np.asarray(got), full[idx])
    sub = take(qt, np.array([1]))
    assert sub.shape == (1, 3, 256)
    np.testing.assert_array_equal(unpack(sub), raw[1:2])


def test_qtensor_is_pytree():
    shape = (2, 512)
    qt = pack(random_raw(QType.Q4_K, shape, np.random.default_rng(0)), QType.Q4_K, shape)
    leaves, tree = jax.tree_util.tree_flatten(qt)
    assert len(leaves) == 5  # d, dmin, m, qs, sc
    qt2 = jax.tree_util.tree_unflatten(tree, leaves)
    assert qt2.shape == shape and qt2.qtype == int(QType.Q4_K)
    dev = jax.device_put(qt)
    assert isinstance(dev.planes["qs"], jax.Array) and dev.shape == shape
    assert qt.nbytes == 2 * 2 * (128 + 8 + 8 + 2 + 2)


def test_layout_is_order_sensitive():
    # The random blocks have distinct per-sub-block scales, so swapping two sub-blocks'
    # scales (what a wrong plane layout would do) must change the decoded values.
    shape = (2, 256)
    for q, key, ax in [(QType.Q2_K, "sc", -1), (QType.Q4_K, "sc", -1)]:
        qt = pack(random_raw(q, shape, np.random.default_rng(1)), q, shape)
        planes = dict(qt.planes)
        planes[key] = planes[key][..., [1, 0] + list(range(2, planes[key].shape[-1]))]
        bad = QTensor(qt.qtype, qt.shape, planes)
        assert not np.array_equal(np.asarray(dequantize(bad)), np.asarray(dequantize(qt)))


def test_pack_rejects_bad_size():
    with pytest.raises(DS4Error):
        pack(np.zeros(100, np.uint8), QType.Q8_0, (2, 64))
    with pytest.raises(DS4Error):
        pack(np.zeros(84, np.uint8), QType.Q2_K, (1, 128))
