"""Smoke tests of the float64 reference model (tests/reference/forward64.py) on the tiny model,
plus unit checks of its numeric primitives against independent formulas.

Run with ``-s`` to see the measurements (logit std per position, act_quant effect, timing).
"""

import math
import os
import sys
import time

import ml_dtypes
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from reference.forward64 import (
    E2M1_VALUES,
    NEG_INF,
    RefModel,
    Rope,
    e2m1_round,
    e4m3_round,
    f16_round,
    fp4_sim,
    fp8_kv_sim,
    frontier_rows,
    hadamard,
    yarn_corr_dims,
    yarn_ramp,
)

N_TOKENS = 150


@pytest.fixture(scope="module")
def runs(tiny_files):
    """The same random token ids through the reference with and without activation quantization."""
    cfg = tiny_files.config
    ref_q = RefModel(tiny_files, act_quant=True)
    ref_f = ref_q.with_act_quant(False)  # shares the float64 weights
    toks = np.random.default_rng(1234).integers(0, cfg.n_vocab, N_TOKENS)
    st_q, st_f = ref_q.new_state(), ref_f.new_state()
    rec = {k: [] for k in ("std", "maxabs", "finite", "rel", "argmax_same", "sel_same")}
    t_q = t_f = 0.0
    for tok in toks:
        t0 = time.perf_counter()
        a = ref_q.step(st_q, int(tok))
        t1 = time.perf_counter()
        b = ref_f.step(st_f, int(tok))
        t_q, t_f = t_q + t1 - t0, t_f + time.perf_counter() - t1
        rec["std"].append(a.std())
        rec["maxabs"].append(np.abs(a).max())
        rec["finite"].append(bool(np.isfinite(a).all()))
        rec["rel"].append(np.linalg.norm(a - b) / np.linalg.norm(b))
        rec["argmax_same"].append(a.argmax() == b.argmax())
        # discrete decisions: indexer rows and routed experts
        rec["sel_same"].append(
            all(
                np.array_equal(lq.last_selected, lf.last_selected)
                for lq, lf in zip(st_q.layers, st_f.layers)
                if lq.idx is not None
            )
            and all(np.array_equal(eq, ef) for eq, ef in zip(st_q.expert_log[-1], st_f.expert_log[-1]))
        )
    rec = {k: np.array(v) for k, v in rec.items()}
    print(
        f"\nreference: {N_TOKENS} tokens, act_quant=True {1e3 * t_q / N_TOKENS:.1f} ms/token,"
        f" act_quant=False {1e3 * t_f / N_TOKENS:.1f} ms/token"
    )
    return cfg, st_q, st_f, rec


# ---- the forward pass -----------------------------------------------------------------------


def test_logits_finite_and_scaled(runs):
    _, _, _, rec = runs
    std = rec["std"]
    print(
        f"logit std per position: min {std.min():.3f} median {np.median(std):.3f} max {std.max():.3f};"
        f" max |logit| {rec['maxabs'].max():.2f}"
    )
    assert rec["finite"].all()
    assert (std > 0.1).all() and (std < 100).all()  # not flat, not exploding
    assert rec["maxabs"].max() < 1e3


def test_state_counts_and_rounding(runs):
    cfg, st, _, _ = runs
    assert st.n_tokens == N_TOKENS and len(st.tokens) == N_TOKENS
    for L, ls in enumerate(st.layers):
        r = cfg.ratio(L)
        assert ls.n_raw == min(N_TOKENS, cfg.n_swa)
        np.testing.assert_array_equal(ls.raw, f16_round(ls.raw))  # §3.8 f16 raw rows
        # the nope dims of every raw row are already FP8-simulated (the round trip is idempotent)
        np.testing.assert_array_equal(np.stack([fp8_kv_sim(x, cfg.n_nope, cfg.fp8_block) for x in ls.raw]), ls.raw)
        if r == 0:
            assert ls.attn is None and ls.n_comp == 0
            continue
        assert ls.n_comp == N_TOKENS // r, (L, ls.n_comp)
        np.testing.assert_array_equal(ls.comp, f16_round(ls.comp))
        fronts = [ls.attn] + ([ls.idx] if ls.idx is not None else [])
        if cfg.has_indexer(L):
            assert ls.n_index_comp == N_TOKENS // r
            np.testing.assert_array_equal(ls.index, f16_round(ls.index))
        live = frontier_rows(r, N_TOKENS)
        for f in fronts:
            assert f.kv.shape == f.score.shape == (cfg.coff(L) * r, f.kv.shape[1])
            dead = np.setdiff1d(np.arange(f.kv.shape[0]), live)
            assert (f.score[live] > 0.5 * NEG_INF).all()
            assert (f.kv[dead] == 0).all() and (f.score[dead] == NEG_INF).all()


def test_indexer_selects_strict_subset(runs):
    cfg, st, _, _ = runs
    idx_layers = [L for L in range(cfg.n_layer) if cfg.has_indexer(L)]
    assert idx_layers
    for L in idx_layers:
        visible, selected = st.index_log[-1][L]
        assert visible == N_TOKENS // 4 > cfg.idx_top_k
        assert selected == cfg.idx_top_k < visible
        sel = st.layers[L].last_selected
        assert len(np.unique(sel)) == cfg.idx_top_k and sel.min() >= 0 and sel.max() < visible
        for p, entry in enumerate(st.index_log):  # all rows while at most top_k are visible
            v, s = entry[L]
            assert v == (p + 1) // 4 and s == min(v, cfg.idx_top_k)


def test_act_quant_effect_small(runs):
    _, _, _, rec = runs
    rel, same = rec["rel"], rec["sel_same"]
    print(
        f"act_quant on vs off: relative logit difference median {np.median(rel):.2e},"
        f" max {rel.max():.2e} (max {rel[same].max():.2e} over the {same.sum()} positions where the"
        f" indexer rows and routed experts were the same); argmax agrees at {rec['argmax_same'].mean():.0%}"
    )
    assert 1e-5 < np.median(rel) < 2e-2  # a real but small perturbation
    assert rel[same].max() < 3e-2  # selection flips add discrete jumps beyond that
    assert rel.max() < 0.2


# ---- primitives -----------------------------------------------------------------------------


def _e4m3_table() -> np.ndarray:
    v = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    return np.unique(v[np.isfinite(v)])


def test_e4m3_round_matches_ml_dtypes():
    rng = np.random.default_rng(0)
    x = (
        np.concatenate(
            [
                rng.uniform(-448, 448, 20000),
                rng.standard_normal(20000) * 10.0 ** rng.uniform(-4, 2, 20000),
            ]
        )
        .astype(np.float32)
        .astype(np.float64)
    )
    table = _e4m3_table()
    pos = table[table >= 0]
    ties = (pos[1:] + pos[:-1]) / 2  # exact midpoints: round half to the even mantissa
    x = np.concatenate([x, ties, -ties, [0.0, 448.0, -448.0, 2.0**-9, 2.0**-10]])
    want = x.astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    np.testing.assert_array_equal(e4m3_round(x), want)
    # clamping: beyond 448 saturates (the reference clamps before rounding, as ds4 does)
    np.testing.assert_array_equal(e4m3_round(np.array([500.0, -1e6])), [448.0, -448.0])


def test_e2m1_round_matches_table_with_even_ties():
    rng = np.random.default_rng(1)
    mids = (E2M1_VALUES[1:] + E2M1_VALUES[:-1]) / 2
    x = np.concatenate([rng.uniform(-6.5, 6.5, 20000), mids, -mids, E2M1_VALUES, [7.0, -9.0]])
    a = np.minimum(np.abs(x), 6.0)
    dist = np.abs(a[:, None] - E2M1_VALUES[None, :])
    best = np.empty(len(x), dtype=int)
    for i, d in enumerate(dist):
        cand = np.flatnonzero(d == d.min())
        even = cand[cand % 2 == 0]
        best[i] = even[0] if len(even) else cand[0]
    want = np.sign(x) * E2M1_VALUES[best]
    np.testing.assert_array_equal(e2m1_round(x), want)
    np.testing.assert_array_equal(e2m1_round(np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])), [0, 1, 1, 2, 2, 4, 4])


def test_block_scales_are_powers_of_two():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 128)) * 10.0 ** rng.uniform(-3, 3, (50, 1))
    for row in x:
        y = fp8_kv_sim(row, 64, 64)
        amax = max(np.abs(row[:64]).max(), 1e-4)
        scale = 2.0 ** math.ceil(math.log2(amax / 448.0))
        np.testing.assert_array_equal(y[:64], e4m3_round(row[:64] / scale) * scale)
        np.testing.assert_array_equal(y[64:], row[64:])
        z = fp4_sim(row, 32)
        for b in range(4):
            blk = row[32 * b : 32 * (b + 1)]
            s = 2.0 ** math.ceil(math.log2(np.abs(blk).max() / 6.0))
            np.testing.assert_array_equal(z[32 * b : 32 * (b + 1)], e2m1_round(blk / s) * s)


def test_hadamard_matches_explicit_matrix():
    n = 128
    H = np.array([[(-1) ** (a & b).bit_count() for b in range(n)] for a in range(n)], dtype=np.float64)
    x = np.random.default_rng(3).standard_normal((3, n))
    np.testing.assert_allclose(hadamard(x), x @ H.T / math.sqrt(n), rtol=0, atol=1e-12)
    np.testing.assert_allclose(hadamard(hadamard(x)), x, rtol=0, atol=1e-12)  # orthonormal, involutive


def test_yarn_ramp_real_config():
    from ds4jax.presets import load_preset, preset_config

    cfg = preset_config(load_preset("flash-q2"))
    lo, hi = yarn_corr_dims(
        cfg.n_rot, cfg.rope_orig_ctx, cfg.compress_rope_freq_base, cfg.yarn_beta_fast, cfg.yarn_beta_slow
    )
    assert (lo, hi) == (15, 25)
    r = yarn_ramp(cfg.n_rot // 2, lo, hi)
    np.testing.assert_allclose(r, [1.0] * 16 + [1 - k / 10 for k in range(1, 10)] + [0.0] * 7, atol=1e-15)
    # layer 2 (ratio 4): theta_k = p*160000^(-2k/64) for k <= 15, that /16 for k >= 25
    p = 1000
    th = Rope.for_layer(cfg, 2).angles(p)
    freq = 160000.0 ** (-2.0 * np.arange(32) / 64)
    np.testing.assert_allclose(th[:16], p * freq[:16], rtol=1e-15)
    np.testing.assert_allclose(th[25:], p * freq[25:] / 16, rtol=1e-15)
    np.testing.assert_allclose(th[20], p * freq[20] * (0.5 + 0.5 / 16), rtol=1e-15)
    # layers 0-1: base 10000, no YaRN
    np.testing.assert_allclose(Rope.for_layer(cfg, 0).angles(p), p * 10000.0 ** (-2.0 * np.arange(32) / 64))
    # rotation of adjacent tail pairs; the inverse undoes it
    x = np.random.default_rng(4).standard_normal((2, 512))
    rope = Rope.for_layer(cfg, 3)
    y = rope.apply(x, 77, 64)
    np.testing.assert_array_equal(y[:, :448], x[:, :448])
    c, s = np.cos(rope.angles(77)[0]), np.sin(rope.angles(77)[0])
    np.testing.assert_allclose(
        y[:, 448:450], np.stack([x[:, 448] * c - x[:, 449] * s, x[:, 448] * s + x[:, 449] * c], axis=1)
    )
    np.testing.assert_allclose(rope.apply(y, 77, 64, inverse=True), x, atol=1e-12)
