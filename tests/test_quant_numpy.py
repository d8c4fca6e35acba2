"""NumPy codecs of ds4jax.quant vs gguf-py (the reference decoder)."""

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

from ds4jax.errors import DS4Error
from ds4jax.quant import QType, decode_numpy, encode, qtype_from_id, row_nbytes, tensor_nbytes
from ds4jax.quant.testing import random_raw

QUANT = [QType.Q8_0, QType.Q2_K, QType.Q4_K, QType.IQ2_XXS]
FLOAT = [QType.F32, QType.F16, QType.BF16]
# >1 block per row, and a 3-D expert tensor.
SHAPES = [(5, 768), (3, 2, 512)]


def g(q):
    return GGMLQuantizationType(int(q))


def test_formats_table():
    for q in QType:
        if q == QType.I32:
            assert (q.block_elems, q.block_bytes) == (1, 4)
            continue
        assert (q.block_elems, q.block_bytes) == GGML_QUANT_SIZES[g(q)]
    assert row_nbytes(QType.Q4_K, 512) == 288
    assert row_nbytes(16, 256) == 66
    assert tensor_nbytes("q8_0", (3, 4, 64)) == 12 * 68
    assert tensor_nbytes(QType.BF16, (7,)) == 14
    assert qtype_from_id(10) is QType.Q2_K
    with pytest.raises(DS4Error) as e:
        qtype_from_id(2)
    assert "\n" not in str(e.value) and "2" in str(e.value)
    with pytest.raises(DS4Error):
        row_nbytes(QType.Q2_K, 300)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("q", QUANT + FLOAT)
def test_decode_matches_gguf(q, shape):
    rng = np.random.default_rng(int(q) * 7 + len(shape))
    raw = random_raw(q, shape, rng)
    assert raw.shape == shape[:-1] + (row_nbytes(q, shape[-1]),)
    got = decode_numpy(raw, q, shape[-1])
    want = gq.dequantize(raw, g(q))
    assert got.dtype == np.float32 and got.shape == shape
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, want.reshape(shape))


def test_decode_i32_and_bad_rows():
    x = np.array([[1, -2, 2**31 - 1]], dtype=np.int32)
    raw = encode(x, QType.I32)
    np.testing.assert_array_equal(decode_numpy(raw, 26, 3), x)
    with pytest.raises(DS4Error):
        decode_numpy(np.zeros((2, 100), np.uint8), QType.Q8_0, 96)


def _gauss(shape, seed):
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal(shape) * np.exp2(rng.uniform(-8, 8, shape[:-1] + (1,)))
    return rows.astype(np.float32)


# Per-row relative RMS error bounds for Gaussian data (measured means: Q8_0 0.53%,
# Q4_K 7.4%, Q2_K 27%, IQ2_XXS 33%).
ERR = {QType.Q8_0: 0.007, QType.Q4_K: 0.085, QType.Q2_K: 0.31, QType.IQ2_XXS: 0.38}


@pytest.mark.parametrize("q", QUANT)
def test_encode_error(q):
    x = _gauss((16, 2048), int(q))
    x[3] *= 0.0  # all-zero row must stay finite and exact
    raw = encode(x, q)
    for y in (decode_numpy(raw, q, 2048), gq.dequantize(raw, g(q))):
        err = np.sqrt(((y - x) ** 2).mean(-1) / np.maximum((x**2).mean(-1), 1e-30))
        assert np.isfinite(y).all()
        np.testing.assert_array_equal(y[3], 0)
        err = np.delete(err, 3)
        assert err.max() < ERR[q], (q.name, err.max())
    x3 = _gauss((2, 3, 512), 5)
    y3 = decode_numpy(encode(x3, q), q, 512)
    assert y3.shape == x3.shape
    assert np.sqrt(((y3 - x3) ** 2).sum() / (x3**2).sum()) < 1.0


@pytest.mark.parametrize("q", FLOAT)
def test_encode_float(q):
    x = _gauss((4, 64), 1)
    raw = encode(x, q)
    want = x if q == QType.F32 else gq.quantize(x, g(q))
    np.testing.assert_array_equal(raw, np.ascontiguousarray(want).view(np.uint8))


def test_encode_q8_0_matches_gguf():
    x = _gauss((8, 256), 3)
    # Exact ties: amax 127 gives d = 1, so x*1/d lands on .5 (rounded away from zero).
    x[0, :32] = np.arange(32) - 15.5
    x[0, 31] = 127
    np.testing.assert_array_equal(encode(x, QType.Q8_0), gq.quantize(x, GGMLQuantizationType.Q8_0))


@pytest.mark.parametrize("q", QUANT)
def test_encode_rejects_partial_block(q):
    with pytest.raises(DS4Error):
        encode(np.zeros((2, q.block_elems + 16), np.float32), q)
