"""The model's scalar numerics against float64 NumPy on random data."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import lax

from ds4jax.model import indexer
from ds4jax.model import numerics as N
from ds4jax.model.linear import expert_linear, q8_0_grouped_matmul, q8_0_matmul
from ds4jax.quant import QType, decode_numpy, encode, pack

RNG = np.random.default_rng(7)


def test_exp_log_accuracy_and_specials():
    x = np.linspace(-87, 88, 400001).astype(np.float32)
    got = np.asarray(jax.jit(N.exp)(x), np.float64)
    ref = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - ref) / ref) < 1.5e-7  # ~1 ulp
    v = np.exp(RNG.uniform(-80, 80, 100000)).astype(np.float32)
    lg = np.asarray(jax.jit(N.log)(v), np.float64)
    assert np.max(np.abs(lg - np.log(v.astype(np.float64))) / np.maximum(1, np.abs(np.log(v)))) < 2e-7
    assert np.asarray(N.exp(jnp.array([-np.inf, -1e30, 0.0]))).tolist() == [0.0, 0.0, 1.0]
    sp = np.asarray(N.softplus(jnp.array([-30.0, -3.0, 0.0, 3.0, 30.0])), np.float64)
    assert np.allclose(sp, np.log1p(np.exp([-30.0, -3.0, 0.0, 3.0, 30.0])), rtol=3e-7)


def test_asum_is_accurate_and_order_free():
    x = (RNG.standard_normal((5, 3000)) * np.exp(RNG.uniform(-8, 8, (5, 3000)))).astype(np.float32)
    exact = x.astype(np.float64).sum(-1)
    got = np.asarray(jax.jit(N.asum)(x))
    assert np.array_equal(got, exact.astype(np.float32))
    perm = RNG.permutation(3000)
    assert np.array_equal(np.asarray(jax.jit(N.asum)(x[:, perm])), got)
    # Batch shape does not change a row.
    assert np.array_equal(np.asarray(jax.jit(N.asum)(x[:1]))[0], got[0])


def test_rms_norm_matches_float64():
    x = (RNG.standard_normal((7, 4096)) * 3).astype(np.float32)
    w = (1 + 0.1 * RNG.standard_normal(4096)).astype(np.float32)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-6) * w
    got = np.asarray(jax.jit(lambda a: N.rms_norm(a, w, 1e-6))(x))
    assert np.max(np.abs(got - ref)) < 4 * np.finfo(np.float32).eps * np.abs(ref).max()


def test_q8_0_activation_quantization_follows_ds4():
    x = (RNG.standard_normal((3, 256)) * 5).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block: d = 0, q = 0
    q, d = jax.jit(N.quantize_q8_0)(x)
    xb = x.reshape(3, 8, 32)
    d_ref = np.abs(xb).max(-1) / np.float32(127)  # f32 division, d kept f32
    inv = np.divide(np.float32(1), d_ref, out=np.zeros_like(d_ref), where=d_ref != 0)
    q_ref = np.clip(np.rint(xb * inv[..., None]), -128, 127)
    assert np.array_equal(np.asarray(d), d_ref)
    assert np.array_equal(np.asarray(q).reshape(3, 8, 32), q_ref)


def test_q8_k_quantization_follows_ds4():
    x = (RNG.standard_normal((2, 512)) * 2).astype(np.float32)
    x[1, 256:] = 0.0
    q, d = jax.jit(N.quantize_q8_k)(x)
    xb = x.reshape(2, 2, 256)
    m = np.take_along_axis(xb, np.abs(xb).argmax(-1)[..., None], -1)[..., 0]
    with np.errstate(divide="ignore"):
        iscale = np.where(m != 0, np.float32(-127) / m, 0).astype(np.float32)
        d_ref = np.where(iscale != 0, np.float32(1) / iscale, 0).astype(np.float32)
    q_ref = np.clip(np.rint(iscale[..., None] * xb), -128, 127)
    assert np.array_equal(np.asarray(q).reshape(2, 2, 256), q_ref)
    assert np.array_equal(np.asarray(d), d_ref)


def test_fp8_matches_ml_dtypes_and_power_of_two_scales():
    x = (RNG.standard_normal((9, 448)) * np.exp(RNG.uniform(-6, 6, (9, 1)))).astype(np.float32)
    got = np.asarray(jax.jit(lambda a: N.fp8_e4m3_round_trip(a, 64))(x))
    xb = x.reshape(9, 7, 64).astype(np.float64)
    amax = np.maximum(np.abs(xb).max(-1, keepdims=True), 1e-4)
    scale = 2.0 ** np.ceil(np.log2(amax / 448.0))
    v = np.clip(xb / scale, -448, 448).astype(np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    assert np.array_equal(got, (v * scale).reshape(9, 448).astype(np.float32))


def test_fp4_rounding_ties_to_even_index():
    levels = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    x = np.zeros((1, 32), np.float32)
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    x[0, : len(ties)] = ties
    x[0, 7] = 6.0  # amax = 6: scale 1
    x[0, 8:15] = [-t for t in ties]
    got = np.asarray(N.fp4_e2m1_round_trip(jnp.asarray(x), 32))[0]
    want = [0, 1, 1, 2, 2, 4, 4, 6, -0.0, -1, -1, -2, -2, -4, -4]
    assert got[:15].tolist() == want
    r = (RNG.standard_normal((4, 128)) * 3).astype(np.float32)
    out = np.asarray(N.fp4_e2m1_round_trip(jnp.asarray(r), 32)).reshape(4, 4, 32)
    scale = 2.0 ** np.ceil(np.log2(np.abs(r.reshape(4, 4, 32)).max(-1, keepdims=True) / 6))
    assert np.all(np.isin(np.abs(out / scale), levels))


def test_hadamard_is_the_scaled_sylvester_matrix():
    n = 128
    H = np.array([[(-1) ** (i & j).bit_count() for j in range(n)] for i in range(n)], np.float64)
    x = RNG.standard_normal((3, n)).astype(np.float32)
    got = np.asarray(N.hadamard(jnp.asarray(x)), np.float64)
    assert np.allclose(got, x @ H.T / math.sqrt(n), atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3])
def test_q8_0_matmul_is_exact_integer_block_dots(rows):
    W = RNG.standard_normal((48, 256)).astype(np.float32)
    w = pack(encode(W, QType.Q8_0), QType.Q8_0, (48, 256))
    x = (RNG.standard_normal((rows, 256)) * 2).astype(np.float32)
    got = np.asarray(jax.jit(q8_0_matmul)(x, w), np.float64)
    q, d = N.quantize_q8_0(jnp.asarray(x))
    xq = np.asarray(q, np.int64).reshape(rows, 8, 32)
    wq = np.asarray(w.planes["qs"], np.int64).reshape(48, 8, 32)
    isum = np.einsum("tbk,obk->tob", xq, wq)
    ref = (isum * np.asarray(w.planes["d"], np.float64)[None] * np.asarray(d, np.float64)[:, None, :]).sum(-1)
    assert np.max(np.abs(got - ref)) <= 2e-6 * np.abs(ref).max()
    # grouped: 2 groups of 24 rows, each on its own half of the input
    g = np.asarray(q8_0_grouped_matmul(jnp.asarray(x.reshape(rows, 2, 128)), pack(
        encode(W[:, :128], QType.Q8_0), QType.Q8_0, (48, 128)), 2))
    full0 = np.asarray(q8_0_matmul(jnp.asarray(x[:, :128]), pack(encode(W[:24, :128], QType.Q8_0), QType.Q8_0, (24, 128))))
    assert np.array_equal(g[:, 0], full0)


@pytest.mark.parametrize("qt", [QType.IQ2_XXS, QType.Q2_K, QType.Q4_K])
def test_expert_matmul_equals_dequantized_dot_with_q8_k(qt):
    W = RNG.standard_normal((5, 16, 512)).astype(np.float32)  # 5 experts
    raw = encode(W, qt)
    w = pack(raw, qt, W.shape)
    ids = jnp.asarray([[4, 0, 2], [1, 4, 3]], jnp.int32)  # 2 tokens x 3 routed experts
    x = (RNG.standard_normal((2, 3, 512)) * 2).astype(np.float32)
    got = np.asarray(jax.jit(expert_linear)(x, w, ids), np.float64)
    q, d = N.quantize_q8_k(jnp.asarray(x))
    xd = (np.asarray(q, np.float64).reshape(2, 3, 2, 256) * np.asarray(d, np.float64)[..., None]).reshape(2, 3, 512)
    wd = decode_numpy(raw, qt, 512).astype(np.float64).reshape(5, 16, 512)[np.asarray(ids)]
    ref = np.einsum("teoi,tei->teo", wd, xd)
    assert np.max(np.abs(got - ref)) <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("k", [1, 7, 40])
def test_top_indices_by_rank_are_lax_top_k(monkeypatch, k):
    """The indexer's top-k from ranks gives lax.top_k's indices: ties to the lower index, +0
    above −0, −inf (invisible rows) last, k up to n."""
    rng = np.random.default_rng(11)
    s = rng.integers(-3, 4, (3, 40)).astype(np.float32)  # many ties
    s[0, ::5] = -np.inf
    s[1, rng.random(40) < 0.5] = -0.0
    s[1, rng.random(40) < 0.3] = 0.0
    s[2] = rng.standard_normal(40).astype(np.float32)
    s = jnp.asarray(s)
    want = np.asarray(lax.top_k(s, k)[1])
    assert np.array_equal(np.asarray(indexer.top_indices(s, k)), want)
    monkeypatch.setattr(indexer, "RANK_TOP_K_MAX", 0)  # the sort beyond the bound
    assert np.array_equal(np.asarray(indexer.top_indices(s, k)), want)
