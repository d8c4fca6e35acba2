"""Pallas kernels against their plain-jnp references, bit for bit, on random data.

Off GPU the kernels run interpreted (``interpret=True``); on a GPU (``JAX_PLATFORMS=cuda``:
the suite defaults to the CPU) the same tests run the compiled kernels. Shapes include row
counts and K that are not multiples of the tiles."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ds4jax.engine import Engine
from ds4jax.errors import DS4Error
from ds4jax.model import attention as model_attention
from ds4jax.model import compressor as model_compressor
from ds4jax.model import hc
from ds4jax.model import indexer as model_indexer
from ds4jax.model.numerics import dd_total, fp4_e2m1_round_trip, quantize_q8_0, quantize_q8_k, sum_squares, swiglu
from ds4jax.model.rope import apply_rope_tail
from ds4jax.quant.formats import QType
from ds4jax.quant.layouts import iq2_nib_planes
from ds4jax.quant.planes import QTensor
from ds4jax.sampling import SamplingParams
from pallas_kernels import (
    attention,
    compressor_pool,
    compressor_row,
    dispatch,
    experts,
    float_dense,
    hadamard,
    hc_post,
    hc_pre,
    indexer_scores,
    indexer_top,
    norms,
    q8_0,
    q8_0_mosaic,
    q8_0_rows,
    quantize,
    sinkhorn,
)
from pallas_kernels.testing import expert_planes

INTERPRET = jax.default_backend() != "gpu"
RNG = np.random.default_rng(7)


def q8_inputs(n, out, k, groups=1, copies=None):
    xq = jnp.asarray(RNG.integers(-128, 128, (n, groups * k), dtype=np.int8))
    dx = jnp.asarray(RNG.uniform(1e-3, 1e-1, (n, groups * k // 32)).astype(np.float32))
    lead = (copies,) if copies else ()
    qs = jnp.asarray(RNG.integers(-128, 128, (*lead, out, k), dtype=np.int8))
    d = jnp.asarray(RNG.uniform(1e-4, 1e-2, (*lead, out, k // 32)).astype(np.float16))
    return xq, dx, qs, d


@pytest.mark.parametrize(
    "out,k,groups,u,cores",
    [
        (96, 512, 1, 16, False),
        (48, 96, 1, 4, False),
        (112, 320, 1, 4, False),
        (64, 2048, 1, 4, False),
        (128, 256, 4, 4, False),
        (64, 2048, 1, 4, True),
        (128, 256, 4, 4, True),
        (112, 320, 1, 4, True),
        (32, 512, 1, 8, False),
        (32, 512, 1, 8, True),
    ],
    ids=[
        "16-block-steps",
        "3-blocks",
        "10-blocks",
        "k-split",
        "grouped",
        "k-split-cores",
        "grouped-cores",
        "10-blocks-cores",
        "8-block-steps",
        "8-block-steps-cores",
    ],
)
def test_q8_0_kernel_is_the_reference_at_every_n(out, k, groups, u, cores):
    xq, dx, qs, d = q8_inputs(4, out, k, groups)
    cfg = dataclasses.replace(q8_0.choose_config(out, k, groups, blocks_per_step=u), cores=cores)
    if k == 2048:
        cfg = dataclasses.replace(cfg, k_splits=2)  # exercise the split-K partial sums
    rows = {}
    for n in (1, 2, 3, 4):
        got = np.asarray(q8_0.matmul(xq[:n], dx[:n], qs, d, groups=groups, cfg=cfg, interpret=INTERPRET))
        want = np.asarray(q8_0.reference(xq[:n], dx[:n], qs, d, groups))
        assert np.isfinite(got).all() and np.array_equal(got, want), np.abs(got - want).max()
        rows[n] = got
    for n in (2, 3, 4):  # the share-weight property: a token's row does not depend on N
        assert np.array_equal(rows[n][: n - 1], rows[4][: n - 1]) and np.array_equal(rows[n][0], rows[1][0])


@pytest.mark.parametrize("n,out,k,groups", [(64, 64, 512, 1), (37, 96, 256, 2)])
def test_q8_0_rows_kernel_is_the_reference(n, out, k, groups):
    """A prefill chunk's rows on the tensor cores (``q8_0_rows``): the reference's bits at every K
    split and row tile, rows padded to the tile, grouped weights; the chosen launch too."""
    xq, dx, qs, d = q8_inputs(n, out, k, groups)
    want = np.asarray(q8_0.reference(xq, dx, qs, d, groups))
    for bt, bo, splits in ((64, 32, 1), (16, 16, 2), (32, 16, 8)):
        if (out // groups) % bo:  # a group's rows are 48 in the second case
            continue
        cfg = q8_0_rows.RowsConfig(block_t=bt, block_rows=bo, k_splits=splits)
        got = np.asarray(q8_0_rows.matmul(xq, dx, qs, d, groups, cfg, interpret=INTERPRET))
        assert np.array_equal(got, want), (bt, bo, splits, np.abs(got - want).max())
    assert np.array_equal(np.asarray(q8_0_rows.matmul(xq, dx, qs, d, groups, interpret=INTERPRET)), want)
    with pytest.raises(ValueError, match="does not tile"):
        q8_0_rows.matmul(xq, dx, qs, d, groups, q8_0_rows.RowsConfig(block_rows=128), interpret=INTERPRET)


def test_dispatch_routes_a_prefill_chunk_to_the_rows_kernel(monkeypatch):
    """More than MAX_TOKENS rows on a GPU (faked; the kernel interpreted): ``q8_0_rows`` for plain,
    grouped and several matrices of one input, with more than one leading axis, the reference's bits;
    on the CPU, or with ``Q8_ROWS`` off in ``auto``, the reference."""
    n = dispatch.MAX_TOKENS + 3
    x = jnp.asarray(RNG.standard_normal((n, 2, 256)).astype(np.float32))
    _, _, qs, d = q8_inputs(1, 64, 256)
    _, _, qs2, d2 = q8_inputs(1, 32, 256)
    _, _, qg, dg = q8_inputs(1, 64, 128, groups=2)
    want = (
        dispatch.q8_0_matmul(x, qs, d),
        dispatch.q8_0_matmuls(x, ((qs, d), (qs2, d2))),
        dispatch.q8_0_matmul(x, qg, dg, groups=2),
    )
    calls, real = [], q8_0_rows.matmul
    monkeypatch.setattr(q8_0_rows, "matmul", lambda *a, **k: calls.append(a[4]) or real(*a, **k, interpret=True))
    monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "gpu")
    monkeypatch.setenv("DS4JAX_KERNELS", "auto")
    got = (
        dispatch.q8_0_matmul(x, qs, d),
        dispatch.q8_0_matmuls(x, ((qs, d), (qs2, d2))),
        dispatch.q8_0_matmul(x, qg, dg, groups=2),
    )
    assert calls == [1, 1, 1, 2]
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        assert a.shape == b.shape and np.array_equal(np.asarray(a), np.asarray(b))
    monkeypatch.setattr(dispatch, "Q8_ROWS", False)
    assert np.array_equal(np.asarray(dispatch.q8_0_matmul(x, qs, d)), np.asarray(want[0])) and len(calls) == 4


def test_q8_0_cores_steps_loaded_together_are_the_reference(monkeypatch):
    """The CUDA-core form with V loop steps' loads issued together (``TileConfig.unroll``): the
    reference's bits at N = 1..4 and in a K split; dispatch's ``CORES_UNROLL`` halves to divide."""
    xq, dx, qs, d = q8_inputs(4, 64, 1024)  # 32 blocks: 8 steps of U = 4
    for splits, v in ((1, 2), (1, 8), (2, 4)):
        cfg = dataclasses.replace(q8_0.choose_config(64, 1024), k_splits=splits, cores=True, unroll=v)
        for n in (1, 3, 4):
            got = np.asarray(q8_0.matmul(xq[:n], dx[:n], qs, d, cfg=cfg, interpret=INTERPRET))
            assert np.array_equal(got, np.asarray(q8_0.reference(xq[:n], dx[:n], qs, d))), (splits, v, n)
    with pytest.raises(ValueError, match="steps a group"):
        q8_0.matmul(xq[:1], dx[:1], qs, d, cfg=dataclasses.replace(cfg, unroll=3), interpret=INTERPRET)
    monkeypatch.setattr(q8_0, "CORES_UNROLL", 16)
    assert q8_0.config_for((4096,), 8192, cores=True).unroll == 8  # attn_output_b: 8 steps a program
    assert q8_0.config_for((4096,), 8192).unroll == 1
    monkeypatch.setattr(q8_0, "CORES_UNROLL", 4)
    # at N ≥ 2, programs of more than 4 steps take 2 at once (attn_q_b: 8), the others keep 4
    assert [q8_0.config_for((32768,), 1024, cores=True, n=n).unroll for n in (1, 2, 4)] == [4, 2, 2]
    assert q8_0.config_for((2048, 2048), 4096, cores=True, n=2).unroll == 4  # the shared expert's gate+up


def test_q8_0_kernel_with_padded_tokens_at_four_blocks_a_step(monkeypatch):
    """Weights from ``PAD_TOKENS_FROM_BYTES`` on (the LM head) take zero-padded tokens instead
    of masked loads at U = 4: the same bits at N = 1..3."""
    monkeypatch.setattr(q8_0, "PAD_TOKENS_FROM_BYTES", 0)
    xq, dx, qs, d = q8_inputs(4, 80, 384)  # a shape no other test traces (jit caches by shape)
    cfg = q8_0.choose_config(80, 384, 1, blocks_per_step=4)
    x = jnp.asarray(RNG.standard_normal((4, 384)).astype(np.float32))
    for n in (1, 2, 3):
        got = np.asarray(q8_0.matmul(xq[:n], dx[:n], qs, d, cfg=cfg, interpret=INTERPRET))
        assert np.array_equal(got, q8_0.reference(xq[:n], dx[:n], qs, d, 1))
        got = np.asarray(q8_0.matmul(x[:n], None, qs, d, cfg=cfg, interpret=INTERPRET))  # zero rows quantized too
        assert np.array_equal(got, q8_0.reference(*quantize_q8_0(x[:n]), qs, d, 1))
    jaxpr = jax.make_jaxpr(lambda a, b: q8_0.matmul(a, b, qs, d, cfg=cfg, interpret=INTERPRET))(xq[:1], dx[:1])
    call = next(e for e in jaxpr.eqns[0].params["jaxpr"].eqns if e.primitive.name == "pallas_call")
    x_in = call.invars[1]  # after the zero
    assert x_in.aval.shape == (4, 384)  # the tokens were padded to the block's 4 rows


@pytest.mark.parametrize(
    "out,k,groups", [(64, 2048, 1), (48, 96, 1), (128, 256, 4)], ids=["k-split", "3-blocks", "grouped"]
)
def test_q8_0_kernel_quantizing_f32_activations_is_the_reference(out, k, groups):
    """dx=None: the kernel quantizes x itself (numerics.quantize_q8_0 in the kernel), same bits."""
    _, _, qs, d = q8_inputs(4, out, k, groups)
    x = RNG.standard_normal((4, groups * k)).astype(np.float32) * 3
    x[1, 32:64] = 0  # an all-zero block: d = 0, q = 0
    x = jnp.asarray(x)
    cfg = q8_0.choose_config(out, k, groups)
    if k == 2048:
        cfg = dataclasses.replace(cfg, k_splits=2)
    for n in (1, 2, 3, 4):
        got = np.asarray(q8_0.matmul(x[:n], None, qs, d, groups=groups, cfg=cfg, interpret=INTERPRET))
        want = np.asarray(q8_0.reference(*quantize_q8_0(x[:n]), qs, d, groups))
        assert np.isfinite(got).all() and np.array_equal(got, want), np.abs(got - want).max()


def test_q8_0_mosaic_kernel_is_the_reference_at_every_n():
    """The Mosaic GPU variant (kept for the Triton-vs-Mosaic comparison): same bits as the
    reference at N = 1, 2, 4, grouped, and reading matrix ``mat`` of a stack."""
    cfg = q8_0_mosaic.MosaicConfig(block_rows=64, blocks_per_step=4, stages=2)
    for out, k, groups in ((128, 256, 1), (128, 128, 2)):
        xq, dx, qs, d = q8_inputs(4, out, k, groups, copies=2)
        qb, dT = q8_0_mosaic.repack(qs, d)
        for n in (1, 2, 4):
            got = np.asarray(q8_0_mosaic.matmul(xq[:n], dx[:n], qb, dT, groups, cfg, INTERPRET, mat=jnp.int32(1)))
            assert np.array_equal(got, q8_0.reference(xq[:n], dx[:n], qs[1], d[1], groups))


def test_q8_0_kernel_reads_the_selected_matrix_of_a_stack():
    xq, dx, qs, d = q8_inputs(2, 64, 512, copies=3)
    got = q8_0.matmul(xq, dx, qs, d, mat=jnp.int32(2), interpret=INTERPRET)
    assert np.array_equal(got, q8_0.reference(xq, dx, qs[2], d[2]))


@pytest.mark.parametrize("outs,k", [((48, 32), 512), ((64, 64), 2048)], ids=["q_a+kv-like", "gate+up-k-split"])
def test_q8_0_kernel_runs_several_matrices_in_one_launch(outs, k):
    """Matrices of one K in one launch (tuples of planes): each output is the reference's, at
    every N and on int8 or f32 (quantized in the kernel) activations, and a token's row does not
    depend on N."""
    xq, dx, _, _ = q8_inputs(4, 16, k)
    mats = [q8_inputs(1, o, k)[2:] for o in outs]
    qs, d = tuple(m[0] for m in mats), tuple(m[1] for m in mats)
    x = jnp.asarray(RNG.standard_normal((4, k)).astype(np.float32))
    cfg = q8_0.config_for(outs, k)
    if k == 2048:
        cfg = dataclasses.replace(cfg, k_splits=2)  # the partial sums of a split, several matrices
    first = None
    for n in (1, 2, 4):
        got = q8_0.matmul(xq[:n], dx[:n], qs, d, cfg=cfg, interpret=INTERPRET)
        gotq = q8_0.matmul(x[:n], None, qs, d, cfg=cfg, interpret=INTERPRET)
        for m, (q, dd) in enumerate(mats):
            assert np.array_equal(got[m], q8_0.reference(xq[:n], dx[:n], q, dd))
            assert np.array_equal(gotq[m], q8_0.reference(*quantize_q8_0(x[:n]), q, dd))
        first = first or [np.asarray(g[0]) for g in got]
        assert all(np.array_equal(g[0], f) for g, f in zip(got, first))


def test_iq2_nibble_layout_holds_the_same_weights():
    """IQ2_XXS repacked to nibbles (``layouts.iq2_nib_planes``): the same integer weights and sub-block
    scales, so the reference gives the same bits; the kernel is checked below like the GGML types."""
    p = expert_planes(jax.random.PRNGKey(7), experts.IQ2_XXS, 3, 16, 2)
    nib = iq2_nib_planes(p)
    v0, s0, _ = experts._int_weights(experts.IQ2_XXS, p)
    v1, s1, _ = experts._int_weights(experts.IQ2_NIB, nib)
    assert np.array_equal(v0, v1) and np.array_equal(s0, s1)
    assert {np.abs(np.asarray(v0)).min(), np.abs(np.asarray(v0)).max()} == {8, 43}
    xq = jnp.asarray(RNG.integers(-128, 128, (4, 512), dtype=np.int8))
    dx = jnp.asarray(RNG.uniform(1e-3, 1e-1, (4, 2)).astype(np.float32))
    ids = jnp.asarray([2, 0, 1, 2], jnp.int32)
    want = experts.reference(xq, dx, experts.IQ2_XXS, p, ids)
    assert np.array_equal(experts.reference(xq, dx, experts.IQ2_NIB, nib, ids), want)


@pytest.mark.parametrize(
    "qtype,version",
    [(q, v) for q in (experts.IQ2_XXS, experts.Q2_K, experts.Q4_K) for v in (1, 3)] + [(experts.IQ2_NIB, 3)],
    ids=["iq2_xxs-v1", "iq2_xxs-v3", "q2_k-v1", "q2_k-v3", "q4_k-v1", "q4_k-v3", "iq2_nib-v3"],
)
def test_expert_kernel_is_the_reference(qtype, version):
    E, out, nb = 6, 48, 2  # 48 rows: three 16-row tiles
    planes = expert_planes(jax.random.PRNGKey(qtype), qtype, E, out, nb)
    ids = jnp.asarray([[5, 0, 3], [3, 1, 5]], jnp.int32)  # 2 tokens x 3 experts, shared experts across tokens
    xq = jnp.asarray(RNG.integers(-128, 128, (6, nb * 256), dtype=np.int8))
    dx = jnp.asarray(RNG.uniform(1e-3, 1e-1, (6, nb)).astype(np.float32))
    got = np.asarray(experts.matmul(xq, dx, ids.reshape(-1), qtype, planes, interpret=INTERPRET, version=version))
    want = np.asarray(experts.reference(xq, dx, qtype, planes, ids.reshape(-1)))
    assert np.isfinite(got).all() and np.array_equal(got, want), np.abs(got - want).max()
    # a pair's result does not depend on which other pairs share the launch
    one = experts.matmul(xq[3:4], dx[3:4], ids.reshape(-1)[3:4], qtype, planes, interpret=INTERPRET, version=version)
    one = np.asarray(one)
    assert np.array_equal(one[0], got[3])
    # one activation row a token for its 3 pairs (read by index, not repeated first)
    x2 = xq[::3]
    shared = experts.matmul(x2, dx[::3], ids.reshape(-1), qtype, planes, interpret=INTERPRET, version=version)
    want2 = experts.reference(jnp.repeat(x2, 3, axis=0), jnp.repeat(dx[::3], 3, axis=0), qtype, planes, ids.reshape(-1))
    assert np.array_equal(np.asarray(shared), np.asarray(want2))
    if version == 3:  # K split in two (partials combined after the kernel); two matrices in one launch
        cfg = experts.ExpertConfig(block_rows=16, k_splits=2)
        split = experts.matmul(xq, dx, ids.reshape(-1), qtype, planes, cfg, interpret=INTERPRET)
        assert np.array_equal(np.asarray(split), want)
        other = expert_planes(jax.random.PRNGKey(qtype + 100), qtype, E, out, nb)
        ya, yb = experts.matmul(xq, dx, ids.reshape(-1), qtype, (planes, other), cfg, interpret=INTERPRET)
        assert np.array_equal(np.asarray(ya), want)
        assert np.array_equal(np.asarray(yb), experts.reference(xq, dx, qtype, other, ids.reshape(-1)))
        # f32 activations quantized in the kernel (Q8_K per super-block), gate+up pair and split
        x = RNG.standard_normal((6, nb * 256)).astype(np.float32) * 2
        x[2, :256] = 0  # an all-zero super-block: d = 0
        x = jnp.asarray(x)
        fa, fb = experts.matmul(x, None, ids.reshape(-1), qtype, (planes, other), cfg, interpret=INTERPRET)
        xq8, dx8 = quantize_q8_k(x)
        assert np.array_equal(np.asarray(fa), experts.reference(xq8, dx8, qtype, planes, ids.reshape(-1)))
        assert np.array_equal(np.asarray(fb), experts.reference(xq8, dx8, qtype, other, ids.reshape(-1)))


@pytest.mark.parametrize(
    "qtype",
    [experts.Q2_K, experts.IQ2_NIB, experts.IQ2_XXS, experts.Q4_K],
    ids=["q2_k", "iq2_nib", "iq2_xxs", "q4_k"],
)
def test_expert_whole_k_programs_are_the_split_launch(qtype):
    """Whole-K programs (every super-block of a row tile at once, the splits' chains added inside)
    give the split launch's bits after its ``finish``, for every split, shared rows and gate+up."""
    E, out, nb = 5, 32, 4
    planes = expert_planes(jax.random.PRNGKey(qtype + 7), qtype, E, out, nb)
    other = expert_planes(jax.random.PRNGKey(qtype + 8), qtype, E, out, nb)
    ids = jnp.asarray([4, 0, 2, 2, 1, 4], jnp.int32)  # 2 tokens x 3 experts
    xq = jnp.asarray(RNG.integers(-128, 128, (2, nb * 256), dtype=np.int8))
    dx = jnp.asarray(RNG.uniform(1e-3, 1e-1, (2, nb)).astype(np.float32))
    want = np.asarray(experts.reference(jnp.repeat(xq, 3, 0), jnp.repeat(dx, 3, 0), qtype, planes, ids))
    for splits in (1, 2, 4):
        split = experts.ExpertConfig(block_rows=16, k_splits=splits, num_warps=1)
        whole = dataclasses.replace(split, whole_k=True)
        a = np.asarray(experts.matmul(xq, dx, ids, qtype, planes, split, interpret=INTERPRET))
        b = np.asarray(experts.matmul(xq, dx, ids, qtype, planes, whole, interpret=INTERPRET))
        assert np.array_equal(a, b) and np.array_equal(b, want), (splits, np.abs(a - b).max())
        ga, gb = experts.matmul(xq, dx, ids, qtype, (planes, other), whole, interpret=INTERPRET)
        assert np.array_equal(np.asarray(ga), want)
        sa, sb = experts.matmul(xq, dx, ids, qtype, (planes, other), split, interpret=INTERPRET)
        assert np.array_equal(np.asarray(ga), np.asarray(sa)) and np.array_equal(np.asarray(gb), np.asarray(sb))
        raw = experts.matmul(xq, dx, ids, qtype, planes, whole, interpret=INTERPRET, raw=True)
        assert len(raw.arrays) == 1 and np.array_equal(np.asarray(raw.value()), want)
    with pytest.raises(ValueError, match="whole-K"):
        experts.matmul(xq.astype(jnp.float32), None, ids, qtype, planes, whole, interpret=INTERPRET)


def test_expert_launch_choice(monkeypatch):
    """Whole-K programs where a type has them on and its super-blocks are a power of two, else the
    narrow split launch; the split (the summation grouping) is the same either way."""
    assert experts.choose_config(experts.Q2_K, 4096, 8) == experts.ExpertConfig(16, 8, num_warps=4, whole_k=True)
    assert experts.choose_config(experts.IQ2_NIB, 2048, 16) == experts.ExpertConfig(32, 4, num_warps=4, whole_k=True)
    assert experts.choose_config(experts.Q2_K, 4096, 6) == experts.ExpertConfig(16, 6, num_warps=1)
    monkeypatch.setattr(experts, "Q2K_WHOLE", 0)
    assert experts.choose_config(experts.Q2_K, 4096, 8) == experts.ExpertConfig(16, 8, num_warps=1)


@pytest.mark.parametrize("qtype", [experts.IQ2_XXS, experts.Q2_K, experts.Q4_K], ids=["iq2_xxs", "q2_k", "q4_k"])
def test_prefill_expert_reference_in_token_groups(qtype, monkeypatch):
    """A prefill chunk's routed experts go through the reference in sequential groups of tokens
    when the gathered weights would be large (at full size: ~120 GB of temporaries at once);
    the bits are the ungrouped reference's, also for the K-quants, whose rounding barrier a
    loop body on XLA:CPU would otherwise lose (``numerics.rounded_in_loop``)."""
    E, out, nb, T, k = 8, 32, 2, 11, 3  # 11 tokens: groups of 2, the last one padded
    planes = expert_planes(jax.random.PRNGKey(qtype), qtype, E, out, nb)
    x = jnp.asarray(RNG.standard_normal((T, 1, nb * 256)).astype(np.float32) * 3)
    ids = jnp.asarray(RNG.integers(0, E, (T, k)), jnp.int32)
    xq, dx = quantize_q8_k(x)
    xq, dx = jnp.broadcast_to(xq, (T, k, nb * 256)), jnp.broadcast_to(dx, (T, k, nb))
    want = np.asarray(jax.jit(lambda a, b, c: experts.reference(a, b, qtype, planes, c))(xq, dx, ids))
    monkeypatch.setattr(dispatch, "REFERENCE_PAIR_ELEMENTS", 2 * k * out * nb * 256)
    monkeypatch.setenv("DS4JAX_KERNELS", "off")
    grouped = jax.jit(lambda a, c: dispatch.expert_matmul(a, qtype, planes, c))
    assert "while" in grouped.lower(x, ids).as_text()  # the grouped path was taken
    assert np.array_equal(np.asarray(grouped(x, ids)), want)


@pytest.mark.parametrize("in_kernel", [True, False], ids=["quantize-in-kernel", "quantize-in-xla"])
def test_dispatch_quantizes_either_side_with_the_same_bits(in_kernel, monkeypatch):
    """``QUANTIZE_IN_KERNEL`` (off by default since session 14) moves the activations' quantization
    between the kernels and XLA; the Q8_0 and expert results keep the reference's bits."""
    monkeypatch.setattr(dispatch, "QUANTIZE_IN_KERNEL", in_kernel)
    monkeypatch.setenv("DS4JAX_KERNELS", "interpret")
    _, _, qs, d = q8_inputs(2, 64, 256)
    x = jnp.asarray(RNG.standard_normal((2, 256)).astype(np.float32))
    assert np.array_equal(dispatch.q8_0_matmul(x, qs, d), q8_0.reference(*quantize_q8_0(x), qs, d))
    E, out, nb, T, k = 4, 32, 2, 2, 3
    planes = expert_planes(jax.random.PRNGKey(1), experts.Q2_K, E, out, nb)
    xe = jnp.asarray(RNG.standard_normal((T, 1, nb * 256)).astype(np.float32) * 3)
    ids = jnp.asarray(RNG.integers(0, E, (T, k)), jnp.int32)
    xq, dx = quantize_q8_k(xe)
    xq, dx = jnp.broadcast_to(xq, (T, k, nb * 256)), jnp.broadcast_to(dx, (T, k, nb))
    want = experts.reference(xq, dx, experts.Q2_K, planes, ids)
    assert np.array_equal(dispatch.expert_matmul(xe, experts.Q2_K, planes, ids), want)


def test_dispatch_passes_a_grouped_launchs_partials_to_the_next_matmul(monkeypatch):
    """attn_output_a's grouped launch with ``split="quant"`` (``SPLIT_SUMS_TO_QUANT``) leaves its
    outputs unfinished (``SplitSums``) for attn_output_b's matmul, whose quantization adds them
    (interpreted: XLA finishes them first; on a GPU the quantize launch): the reference chain's bits."""
    from pallas_kernels.common import SplitSums

    monkeypatch.setattr(dispatch, "SPLIT_SUMS_TO_QUANT", True)
    monkeypatch.setenv("DS4JAX_KERNELS", "interpret")
    G, k, r = 2, 256, 64
    _, _, qa, da = q8_inputs(2, G * r, k)
    _, _, qb, db = q8_inputs(2, 64, G * r)
    x = jnp.asarray(RNG.standard_normal((2, G * k)).astype(np.float32))
    low = dispatch.q8_0_matmul(x, qa, da, G, split="quant")
    assert isinstance(low, SplitSums) and low.shape == (2, G * r)
    got = dispatch.q8_0_matmul(low, qb, db)
    mid = q8_0.reference(*quantize_q8_0(x), qa, da, G)
    assert np.array_equal(np.asarray(got), np.asarray(q8_0.reference(*quantize_q8_0(mid), qb, db)))


def test_dispatch_takes_the_norms_quantization(monkeypatch):
    """``pre`` (the quantization ``rms_norm_quant`` made in the norm's launch) is what the Q8_0
    and expert kernels read: given another row's quantization, they return that row's result."""
    monkeypatch.setenv("DS4JAX_KERNELS", "interpret")
    _, _, qs, d = q8_inputs(2, 64, 256)
    x, other = (jnp.asarray(RNG.standard_normal((2, 256)).astype(np.float32)) for _ in range(2))
    want = q8_0.reference(*quantize_q8_0(other), qs, d)
    assert np.array_equal(dispatch.q8_0_matmul(x, qs, d, pre={"q8_0": quantize_q8_0(other)}), want)
    got = dispatch.q8_0_matmuls(x, ((qs, d), (qs[:32], d[:32])), pre={"q8_0": quantize_q8_0(other)})
    assert np.array_equal(got[0], want) and np.array_equal(got[1], want[:, :32])
    E, out, nb, T, k = 4, 32, 2, 2, 3
    planes = expert_planes(jax.random.PRNGKey(1), experts.Q2_K, E, out, nb)
    xe, oe = (jnp.asarray(RNG.standard_normal((T, 1, nb * 256)).astype(np.float32) * 3) for _ in range(2))
    ids = jnp.asarray(RNG.integers(0, E, (T, k)), jnp.int32)
    xq, dx = quantize_q8_k(oe)
    want = experts.reference(
        jnp.broadcast_to(xq, (T, k, nb * 256)), jnp.broadcast_to(dx, (T, k, nb)), experts.Q2_K, planes, ids
    )
    got = dispatch.expert_matmul(xe, experts.Q2_K, planes, ids, pre={"q8_k": quantize_q8_k(oe[:, 0])})
    assert np.array_equal(got, want)


def test_q8_0_auto_policy_at_one_token():
    """``auto`` at N=1: the kernel on weights of 8 MB and more, XLA on the small ones (the
    decode step's GPU time, 8 full-size layers, KERNELS.md sessions 14 and 26)."""
    assert dispatch._q8_auto(1, 129280, 4096)  # LM head
    assert dispatch._q8_auto(1, 32768, 1024)  # attn_q_b
    assert dispatch._q8_auto(1, 4096, 8192)  # attn_output_b
    assert dispatch._q8_auto(1, 8192, 4096)  # attn_output_a (grouped)
    assert dispatch._q8_auto(1, 4096, 2048)  # shared expert down (8 Mi weights: the threshold)
    assert not dispatch._q8_auto(1, 1024, 4096)  # attn_q_a alone
    assert all(dispatch._q8_auto(n, 512, 4096) for n in (2, 3, 4))


@pytest.mark.parametrize("shape", [(1, 64, 128), (3, 5, 128), (2, 256), (7, 8)], ids=["q", "odd-rows", "n256", "n8"])
def test_hadamard_kernel_is_the_reference(shape):
    """Every butterfly stage in the reference's order, so the same bits (random data; rows that
    are not a multiple of the block)."""
    x = jnp.asarray(RNG.standard_normal(shape).astype(np.float32) * 3)
    got = np.asarray(hadamard.hadamard(x, block_rows=4, interpret=INTERPRET))
    want = np.asarray(hadamard.reference(x))
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.array_equal(np.asarray(dispatch.hadamard(x)), want)


@pytest.mark.parametrize("T,H,R", [(1, 16, 8), (3, 4, 4)])
def test_indexer_query_launch_is_the_reference(T, H, R):
    """The indexer's query chain in one launch: each token's heads tail-rotated by its own angles,
    then the Hadamard transform and the FP4 round trip per 32, bit for bit (values of wide range,
    some FP4 blocks all zero)."""
    x = RNG.standard_normal((T, H, 128)).astype(np.float32) * np.exp2(RNG.integers(-8, 8, (T, H, 1)))
    x[0, 1] = 0.0
    x = jnp.asarray(x)
    ang = RNG.uniform(0, 6, (T, 32)).astype(np.float32)
    cos, sin = jnp.asarray(np.cos(ang)), jnp.asarray(np.sin(ang))
    assert hadamard.rope_supported(x, cos, 32)
    got = hadamard.rope_hadamard_fp4(x, cos, sin, 32, block_rows=R, interpret=INTERPRET)
    want = fp4_e2m1_round_trip(hadamard.reference(apply_rope_tail(x, cos[:, None, :], sin[:, None, :])), 32)
    assert np.array_equal(np.abs(np.asarray(got)), np.abs(np.asarray(want)))  # a zero's sign: ``hadamard``
    assert np.array_equal(np.asarray(got), np.asarray(want))


def _same_norms(got, want):
    for (y, pre), (y_ref, pre_ref) in zip(got, want, strict=True):
        assert np.array_equal(np.asarray(y).view(np.uint32), np.asarray(y_ref).view(np.uint32))
        assert pre.keys() == pre_ref.keys()
        for k in pre:
            for g, w in zip(pre[k], pre_ref[k], strict=True):
                assert g.dtype == w.dtype and np.array_equal(g, w), k


@pytest.mark.parametrize("T,chunks", [(1, 4), (3, 2)])
def test_fused_norm_kernels_are_the_reference(T, chunks):
    a = jnp.asarray(RNG.standard_normal((T, 1024)).astype(np.float32) * 3)
    b = jnp.asarray(RNG.standard_normal((T, 512)).astype(np.float32))
    wa, wb = (jnp.asarray(RNG.standard_normal(n).astype(np.float32)) for n in (1024, 512))
    # The Q_A/KV_A pair (Q_A quantized for attn_q_b), then an FFN input quantized both ways, with
    # a zero block and a block whose largest |x| is tied between signs (Q8_K takes the first).
    x = RNG.standard_normal((T, 2048)).astype(np.float32)
    x[0, 256:512] = 0.0
    x[-1, 600], x[-1, 700] = -9.0, 9.0
    parts = [((a, wa, ("q8_0",)), (b, wb, ())), ((jnp.asarray(x), jnp.ones(2048, jnp.float32), ("q8_0", "q8_k")),)]
    for p in parts:
        assert norms.quant_supported(p, chunks)
        got = norms.rms_norm_quant(p, 1e-6, chunks=chunks, interpret=INTERPRET)
        _same_norms(got, norms.rms_norm_quant_reference(p, 1e-6))
    q = jnp.asarray(RNG.standard_normal((T, 8, 128)).astype(np.float32) * 2)  # 8 heads of 128, 32 rope pairs
    ang = RNG.uniform(0, 6, (T, 32)).astype(np.float32)
    cos, sin = jnp.asarray(np.cos(ang)), jnp.asarray(np.sin(ang))
    for heads in (1, 4):  # the engine's launch takes one head a program
        got = norms.head_norm_rope(q, cos, sin, 1e-6, heads_per_program=heads, interpret=INTERPRET)
        assert np.array_equal(got, norms.head_norm_rope_reference(q, cos, sin, 1e-6))


@pytest.mark.parametrize("T,chunks", [(1, 4), (3, 2)])
def test_norm_launch_makes_the_kv_rows_as_the_reference(T, chunks):
    """The Q_A/KV_A norms' launch with ``kv_row``: Q_A's normed rows and quantization as before, and
    KV_A's rows as the raw window stores them (tail RoPE, FP8 head, f16) with the bits of
    ``attention.kv_row_values``; rows of wide range, random angles."""
    from types import SimpleNamespace

    from ds4jax.model.attention import kv_row_values

    a = jnp.asarray(RNG.standard_normal((T, 1024)).astype(np.float32) * 3)
    b = RNG.standard_normal((T, 512)) * np.exp2(RNG.integers(-4, 4, (1, 512)))
    b = jnp.asarray(b.astype(np.float32))
    wa, wb = (jnp.asarray(RNG.uniform(0.2, 3.0, n).astype(np.float32)) for n in (1024, 512))
    ang = RNG.uniform(0, 6, (T, 32)).astype(np.float32)
    cos, sin = jnp.asarray(np.cos(ang)), jnp.asarray(np.sin(ang))
    parts = ((a, wa, ("q8_0",)), (b, wb, ()))
    kv = (448, 64, 32)
    assert norms.quant_supported(parts, chunks, kv) and not norms.quant_supported(parts[::-1], chunks, kv)
    got = norms.rms_norm_quant(parts, 1e-6, chunks=chunks, interpret=INTERPRET, kv_row=(cos, sin, 448, 64))
    want = norms.rms_norm_quant_reference(parts, 1e-6)
    _same_norms(got[:1], want[:1])
    cfg = SimpleNamespace(n_nope=448, fp8_block=64)
    row = np.asarray(kv_row_values(want[1][0], cos, sin, cfg))
    assert got[1][0].dtype == jnp.float16 and np.array_equal(np.asarray(got[1][0]).view(np.uint16), row.view(np.uint16))
    if T == 1:  # decode: the row written into its slot of a raw window (a ring of 8 rows), in place
        raw = jnp.asarray(RNG.standard_normal((8, 512)).astype(np.float16))
        assert norms.quant_supported(parts, chunks, kv, (raw, 5)) and not norms.quant_supported(
            parts, chunks, None, (raw, 5)
        )
        ring = norms.rms_norm_quant(
            parts, 1e-6, chunks=chunks, interpret=INTERPRET, kv_row=(cos, sin, 448, 64), ring=(raw, jnp.int32(5))
        )
        _same_norms(ring[:1], want[:1])
        want_ring = np.asarray(raw).copy()
        want_ring[5] = row[0]
        assert ring[1][0].shape == raw.shape and ring[1][0].dtype == jnp.float16
        assert np.array_equal(np.asarray(ring[1][0]).view(np.uint16), want_ring.view(np.uint16))


@pytest.mark.parametrize("sums", ["reduce", "chain"])
def test_sinkhorn_kernel_is_the_reference(sums):
    c = jnp.asarray(RNG.standard_normal((3, 4, 4)).astype(np.float32) * 3)
    got = np.asarray(sinkhorn.sinkhorn(c, 20, 1e-6, sums=sums, interpret=INTERPRET))
    assert np.array_equal(got, sinkhorn.reference(c, 20, 1e-6))


@pytest.mark.parametrize("qtype", ["IQ2_XXS", "Q2_K", "Q4_K"])
@pytest.mark.parametrize("narrow", [True, False])
def test_narrow_expert_programs_are_the_reference(monkeypatch, narrow, qtype):
    """Each expert type in its narrow programs (``experts.NARROW_LAUNCH``: 16 rows and 1 warp, the
    default) or at 64 rows and 4 warps (``IQ2_NARROW`` etc. off), as dispatch picks them at trace
    time: the reference's bits either way."""
    qt = getattr(experts, qtype)
    flag = {"IQ2_XXS": "IQ2_NARROW", "Q2_K": "Q2K_NARROW", "Q4_K": "Q4K_NARROW"}[qtype]
    monkeypatch.setattr(experts, flag, narrow)
    for whole in ("Q2K_WHOLE", "IQ2_WHOLE", "Q4K_WHOLE"):  # the split launch (whole-K programs: their own test)
        monkeypatch.setattr(experts, whole, 0)
    splits = 8 if qtype == "Q2_K" else 2  # 1 super-block a program for Q2_K, else 4
    rows, warps = experts.NARROW_LAUNCH[qt]
    narrow_cfg = experts.ExpertConfig(rows, splits, num_warps=warps)
    assert experts.choose_config(qt, 64, 8) == (narrow_cfg if narrow else experts.ExpertConfig(64, splits))
    planes = expert_planes(jax.random.PRNGKey(70), qt, 4, 64, 2)
    x = jnp.asarray(RNG.standard_normal((2, 1, 512)).astype(np.float32))
    ids = jnp.asarray([[3, 0, 1], [2, 2, 0]], jnp.int32)
    monkeypatch.setenv("DS4JAX_KERNELS", "interpret" if INTERPRET else "all")
    got = dispatch.expert_matmul(x, qt, planes, ids)
    monkeypatch.setenv("DS4JAX_KERNELS", "off")
    assert np.array_equal(np.asarray(got), np.asarray(dispatch.expert_matmul(x, qt, planes, ids)))


@pytest.mark.parametrize(
    "T,second,prefetch",
    [(1, "shared", False), (3, "per-token", False), (2, None, False), (3, "per-token", True), (3, "prefix", True)],
)
def test_attention_kernels_are_the_reference(T, second, prefetch):
    """The decode attention sums (scores, then softmax with the sink and mix) against the model's
    XLA path, bit for bit: the raw window (shared keys, not a whole key block) with random
    visibility, and a second key set shared (ratio-128 rows) or read by index per token (the
    indexer's rows: random rows, some invisible); enough keys for several mix splits a part; the
    loops' loads in order or a step ahead (``prefetch``). ``prefix``: a cache's rows visible up to
    each token's count (0, a few, most), the raw window's after its first keys random: whole key
    blocks and whole splits unseen, which the launches skip (``SKIP_UNSEEN``)."""
    H, hd, R1, R2 = 8, 128, 131 + T, 160
    q = jnp.asarray(RNG.standard_normal((T, H, hd)).astype(np.float32) * 3)
    f16 = lambda *shape: jnp.asarray(RNG.standard_normal(shape).astype(np.float16))
    vis1 = RNG.random((T, R1)) < 0.8
    if second == "prefix":
        vis1[:, 40:] = False
    parts = [(f16(R1, hd), None, jnp.asarray(vis1))]
    if second == "shared":
        parts.append((f16(R2, hd), None, jnp.asarray(RNG.random((T, R2)) < 0.6)))
    elif second == "prefix":
        n_vis = np.array([0, 7, 150])[:T]
        parts.append((f16(R2, hd), None, jnp.asarray(np.arange(R2)[None, :] < n_vis[:, None])))
    elif second == "per-token":
        K = 100
        rows = jnp.asarray(RNG.integers(0, R2, (T, K)).astype(np.int32))
        parts.append((f16(R2, hd), rows, jnp.asarray(RNG.random((T, K)) < 0.6)))
    sink = jnp.asarray(RNG.standard_normal(H).astype(np.float32))
    scale = np.float32(1.0 / np.sqrt(hd))
    want = model_attention.sink_attention(q, tuple(model_attention.f32_keys(parts)), sink, scale)
    got = attention.sink_attention(q, tuple(parts), sink, float(scale), interpret=INTERPRET, prefetch=prefetch)
    assert np.array_equal(np.asarray(got), np.asarray(want))
    if prefetch:
        return
    # The epilogue as a launch, on to the output projection's input: the tail (16 pairs, in the
    # head's last 128 columns) inverse-rotated, then quantized per 32.
    ang = RNG.uniform(0, 6, (T, 16)).astype(np.float32)
    cos, sin = jnp.asarray(np.cos(ang)), jnp.asarray(np.sin(ang))
    assert attention.out_supported(q, cos)
    o, (qq, dq) = attention.sink_attention(
        q, tuple(parts), sink, float(scale), interpret=INTERPRET, quant_rotated=(cos, sin)
    )
    assert np.array_equal(np.asarray(o), np.asarray(want))
    rot = apply_rope_tail(want, cos[:, None, :], sin[:, None, :], inverse=True)
    wq, wd = quantize_q8_0(rot.reshape(T, H * hd))
    assert np.array_equal(np.asarray(qq).reshape(T, -1), np.asarray(wq))
    assert np.array_equal(np.asarray(dq).reshape(T, -1), np.asarray(wd))


def hc_inputs(T, n, d):
    """Random hyper-connection state and mixer (magnitudes like a trained model's)."""
    R = n * (n + 2)
    H = jnp.asarray(RNG.standard_normal((T, n, d)).astype(np.float32) * 2)
    fn = jnp.asarray((RNG.standard_normal((R, n * d)) * 0.05).astype(np.float16))
    scale = jnp.asarray(RNG.uniform(0.2, 2.0, 3).astype(np.float32))
    base = jnp.asarray(RNG.standard_normal(R).astype(np.float32))
    return H, fn, scale, base


@pytest.mark.parametrize("T,splits,columns", [(1, 2, 1), (3, 1, 1), (3, 2, 4)])
def test_hc_pre_kernel_is_the_reference(T, splits, columns):
    """The pre-mix kernels (the mixer, the gates, the Sinkhorn) against the model's XLA path: x, post and comb, bit for
    bit, with the K range in one slice or two, the gates in one program a token or four along the
    columns (3 Sinkhorn rounds: the full 20 compile slowly interpreted; the Sinkhorn kernel's own
    test runs them)."""
    H, fn, scale, base = hc_inputs(T, 4, 256)
    want = hc._hc_pre(H, QTensor(int(QType.F16), fn.shape, {"w": fn}), scale, base, 3, 1e-6, 1e-6)
    got = hc_pre.hc_pre(H, fn, scale, base, 3, 1e-6, 1e-6, splits=splits, gate_columns=columns, interpret=INTERPRET)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert np.array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("T,cols", [(1, 64), (3, 256)])
def test_hc_post_kernel_is_the_reference_and_feeds_the_mixer(T, cols):
    """The post-mix kernel against the model's XLA path, bit for bit; its squares' pairs total
    Σ H'² as ``sum_squares`` rounds it; and the pre-mix kernel reading them gives the bits it gives
    summing the squares itself (one slice, or four slices of 64 columns)."""
    H, fn, scale, base = hc_inputs(T, 4, 256)
    y = jnp.asarray(RNG.standard_normal((T, 256)).astype(np.float32))
    post = jnp.asarray(RNG.uniform(0.0, 2.0, (T, 4)).astype(np.float32))
    comb = jnp.asarray(RNG.uniform(0.0, 1.0, (T, 4, 4)).astype(np.float32))
    new, (ss, se) = hc_post.hc_post(H, y, post, comb, cols=cols, interpret=INTERPRET)
    assert np.array_equal(np.asarray(new), np.asarray(hc.hc_post(H, y, post, comb)))
    assert ss.shape == (T, 256 // cols, 4)
    total = dd_total(ss.reshape(T, -1), se.reshape(T, -1))
    assert np.array_equal(np.asarray(total), np.asarray(sum_squares(new.reshape(T, -1))))
    mix = functools.partial(hc_pre.hc_pre, n_iter=3, rms_eps=1e-6, hc_eps=1e-6, splits=2, interpret=INTERPRET)
    for g, w in zip(mix(new, fn, scale, base, squares=(ss, se)), mix(new, fn, scale, base)):
        assert np.array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("T,H", [(1, 16), (3, 4)])
def test_indexer_scores_kernel_is_the_reference(T, H):
    """The indexer's scores launch against ``indexer.head_scores``, bit for bit: 2 head blocks or
    one of 4 heads (the tiny model's), 2 head-dim steps, 37 rows (the last key block padded),
    weights of both signs, and dots of both signs (the ReLU), one row all zeros (an unwritten
    slot) and one with a single term. Then with visible counts (none, part of a block, all): the
    blocks from a token's count on are skipped, the masked scores unchanged."""
    hd, R = 64, 37
    q = RNG.standard_normal((T, H, hd)).astype(np.float32)
    tab = RNG.standard_normal((R, hd)).astype(np.float16)
    tab[5] = 0
    tab[9, 1:] = 0
    w = (RNG.standard_normal((T, H)) * 10.0 ** RNG.integers(-2, 2, (T, H))).astype(np.float32)
    q, w, tab = jnp.asarray(q), jnp.asarray(w), jnp.asarray(tab)
    got = indexer_scores.scores(q, w, tab, interpret=INTERPRET)
    want = model_indexer.head_scores(q, w, tab)
    assert np.array_equal(np.asarray(got), np.asarray(want))
    n_vis = jnp.asarray([17] if T == 1 else [0, 17, 37], jnp.int32)
    seen = np.arange(R)[None, :] < np.asarray(n_vis)[:, None]
    got = indexer_scores.scores(q, w, tab, n_vis, interpret=INTERPRET)
    assert np.array_equal(np.where(seen, np.asarray(got), -np.inf), np.where(seen, np.asarray(want), -np.inf))
    assert not np.any(np.asarray(got)[~seen & (np.arange(R)[None, :] >= 32)])  # the skipped block: zeros


@pytest.mark.parametrize("T,n,k", [(1, 273, 64), (4, 67, 67)])
def test_indexer_top_kernel_is_the_top_k(T, n, k):
    """The indexer's top-k launch against ``lax.top_k`` of the masked scores (and ``top_indices``):
    ties (a repeated score, +0 against -0, a visible -inf, which ties the hidden rows and ranks
    before them) and, in one token, a negative NaN (below every hidden row); visible counts of none,
    fewer than k (the hidden rows fill the slots in index order), more than k, all, and a count
    past a program's rows; tables of rows that fill no whole program (a context over the ratio
    plus a window's rows). Whatever the kernel reads past the count must not matter: those scores
    are NaN in the kernel's input."""
    s = RNG.standard_normal((T, n)).astype(np.float32)
    s[:, ::7] = s[:, 3:4]
    s[0, 5], s[0, 6], s[0, 9] = -0.0, 0.0, -np.inf
    n_vis = np.asarray([150] if T == 1 else [0, 20, 40, n], np.int32)
    if T > 1:
        s[2, 11] = -np.nan  # sign bit set: below -inf in total order
        assert np.signbit(s[2, 11])
    seen = np.arange(n)[None, :] < n_vis[:, None]
    masked = jnp.asarray(np.where(seen, s, -np.inf))
    got = np.asarray(
        indexer_top.top(jnp.asarray(np.where(seen, s, np.nan)), jnp.asarray(n_vis), k, interpret=INTERPRET)
    )
    want = np.asarray(jax.lax.top_k(masked, k)[1])
    assert np.array_equal(got, want)
    assert np.array_equal(np.asarray(model_indexer.top_indices(masked, k)), want)
    if T > 1:
        assert want[1, 20] == 20 and want[2, k - 1] == 11  # hidden rows in order; the NaN last


@pytest.mark.parametrize("ratio,coff,hd,n_slots", [(4, 2, 128, 3), (32, 1, 64, 2)])
def test_compressor_pool_kernel_is_the_reference(ratio, coff, hd, n_slots):
    """A compressor's window pooling against ``compressor._pool``, bit for bit: the overlapping
    form (previous window through the first half of the columns) and the plain one at 16 columns
    a program; scores of wide range, windows partly filled (the NEG_INF sentinel behind the
    frontier) and one column with no real score in a window (pools to 0)."""
    L = (coff - 1 + n_slots) * ratio
    kv = RNG.standard_normal((L, coff * hd)).astype(np.float32)
    sc = (RNG.standard_normal((L, coff * hd)) * 10.0 ** RNG.integers(-1, 2, (L, 1))).astype(np.float32)
    sc[-(ratio // 2) :] = -1e30  # the last window's unfilled rows
    kv[-(ratio // 2) :] = 0.0
    col = coff * hd - 3
    sc[(coff - 1) * ratio : coff * ratio, col] = -1e30  # slot 0 of that column: no real score
    if coff == 2:
        sc[:ratio, col - hd] = -1e30
    kv, sc = jnp.asarray(kv), jnp.asarray(sc)
    got = np.asarray(compressor_pool.pool(kv, sc, ratio, coff, hd, n_slots, interpret=INTERPRET))
    want = np.asarray(model_compressor._pool(kv, sc, ratio, coff, hd, n_slots))
    assert np.all(want[0, hd - 3] == 0) and np.any(want != 0)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("ratio,coff,hd,pos0", [(4, 2, 128, 13), (4, 2, 128, 16), (4, 2, 64, 7), (32, 1, 64, 77)])
def test_compressor_pool_ring_kernel_is_the_reference(ratio, coff, hd, pos0):
    """Decode's pooling from the frontier ring with the token's row written in place, against the
    XLA path (the window buffer from ``frontier_view`` and the row, ``_pool``, the row put into its
    slot), bit for bit: rings full of rows of older windows (which must read as absent), an odd and
    an even ratio-4 window, a window's first and last token."""
    R, C = coff * ratio, coff * hd
    ring_kv = jnp.asarray(RNG.standard_normal((R, C)).astype(np.float32))
    ring_sc = jnp.asarray((RNG.standard_normal((R, C)) * 10.0 ** RNG.integers(-1, 2, (R, 1))).astype(np.float32))
    kv = jnp.asarray(RNG.standard_normal((1, C)).astype(np.float32))
    sc = jnp.asarray((RNG.standard_normal((1, C)) * 3).astype(np.float32))
    p = jnp.int32(pos0)
    got, (gkv, gsc) = compressor_pool.pool_ring(ring_kv, ring_sc, kv, sc, p, ratio, coff, hd, interpret=INTERPRET)
    front_kv, front_sc = model_compressor.frontier_view(ring_kv, ring_sc, p, ratio, coff)
    at = (coff - 1) * ratio + pos0 % ratio
    buf_kv, buf_sc = front_kv.at[at].set(kv[0]), front_sc.at[at].set(sc[0])
    want = model_compressor._pool(buf_kv, buf_sc, ratio, coff, hd, 1)
    assert np.array_equal(np.asarray(got), np.asarray(want))
    here = pos0 % R
    assert np.array_equal(np.asarray(gkv), np.asarray(ring_kv.at[here].set(kv[0])))
    assert np.array_equal(np.asarray(gsc), np.asarray(ring_sc.at[here].set(sc[0])))


@pytest.mark.parametrize(
    "ratio,hd,n_pairs,trip,pos0,n_tok,n_slots",
    [
        (4, 512, 32, ("fp8", 448, 64), 5, 4, 2),
        (4, 128, 8, ("fp8", 64, 32), 6, 1, 1),
        (128, 128, 8, ("fp8", 96, 32), 255, 1, 1),
        (4, 128, 32, ("fp4", 32), 7, 1, 1),
        (4, 64, 8, ("fp4", 32), 2, 4, 2),
    ],
)
def test_compressor_row_kernel_writes_the_references_complete_rows(ratio, hd, n_pairs, trip, pos0, n_tok, n_slots):
    """A compressor's rows into the cache (norm, tail RoPE, the attention's FP8 head or the
    indexer's Hadamard and FP4, f16) against the XLA path, bit for bit, on the rows of complete
    windows; the rows of incomplete windows keep what the cache held (rows of wide range, random
    RoPE tables and cache)."""
    from ds4jax.model.numerics import fp4_e2m1_round_trip, fp8_e4m3_head, hadamard

    rows = RNG.standard_normal((n_slots, hd)) * np.exp2(RNG.integers(-6, 6, (n_slots, 1)))
    rows = jnp.asarray((rows * np.exp2(RNG.integers(-3, 3, (1, hd)))).astype(np.float32))
    w = jnp.asarray(RNG.uniform(0.2, 3.0, hd).astype(np.float32))
    ang = RNG.uniform(0, 2 * np.pi, (400, n_pairs))
    cos, sin = (jnp.asarray(f(ang).astype(np.float32)) for f in (np.cos, np.sin))
    cache = jnp.asarray(RNG.standard_normal((8, hd)).astype(np.float16))
    got = compressor_row.rows_into_cache(
        rows, w, cos, sin, cache, jnp.int32(pos0), n_tok, ratio, 1e-6, trip, interpret=INTERPRET
    )
    start = pos0 - pos0 % ratio + ratio * np.arange(n_slots)
    if trip[0] == "fp8":
        fn = lambda v: fp8_e4m3_head(v, trip[1], trip[2])
    else:
        fn = lambda v: fp4_e2m1_round_trip(hadamard(v), trip[1])
    r = model_compressor.row_values(rows, w, cos[start], sin[start], 1e-6, fn).astype(jnp.float16)
    done = (pos0 % ratio + n_tok) // ratio
    want = np.asarray(cache).copy()
    want[pos0 // ratio : pos0 // ratio + done] = np.asarray(r)[:done]
    assert done in (0, 1) and np.asarray(got).dtype == np.float16
    assert np.array_equal(np.asarray(got).view(np.uint16), want.view(np.uint16))
    # ``every`` (a prefill chunk): every slot's row, where the XLA path's update puts it (its start
    # clamped to the cache: pos0 + 6 windows on puts the last rows past the 8 of this cache)
    for p0 in (pos0, pos0 + 6 * ratio):
        start = p0 - p0 % ratio + ratio * np.arange(n_slots)
        r = model_compressor.row_values(rows, w, cos[start % 400], sin[start % 400], 1e-6, fn).astype(jnp.float16)
        want = np.asarray(jax.lax.dynamic_update_slice(cache, r, (p0 // ratio, 0)))
        tabs = (jnp.concatenate([cos] * 3), jnp.concatenate([sin] * 3))  # positions up to 1,200
        got = compressor_row.rows_into_cache(
            rows, w, *tabs, cache, jnp.int32(p0), n_tok, ratio, 1e-6, trip, interpret=INTERPRET, every=True
        )
        assert np.array_equal(np.asarray(got).view(np.uint16), want.view(np.uint16)), p0


def test_hc_post_kernel_sums_the_ffn_terms_as_the_reference():
    """With the FFN's parts (6 routed experts' outputs beside the shared expert's) the post-mix
    kernel gives the bits of the XLA path fed their sum (``hc.with_terms``): terms of mixed scales
    and signs, some cancelling to a few ulps of the largest."""
    T, k = 2, 6
    H = hc_inputs(T, 4, 256)[0]
    y = jnp.asarray(RNG.standard_normal((T, 256)).astype(np.float32))
    t = RNG.standard_normal((T, k, 256)) * 10.0 ** RNG.integers(-3, 3, (T, k, 1))
    t[:, 1] = -t[:, 0] * (1 + 2.0**-20)  # near-cancelling pairs: the sum's order must not matter
    terms = jnp.asarray(t.astype(np.float32))
    post = jnp.asarray(RNG.uniform(0.0, 2.0, (T, 4)).astype(np.float32))
    comb = jnp.asarray(RNG.uniform(0.0, 1.0, (T, 4, 4)).astype(np.float32))
    new, _ = hc_post.hc_post(H, y, post, comb, terms, cols=64, interpret=INTERPRET)
    want = hc.hc_post(H, hc.with_terms(y, terms), post, comb)
    assert np.array_equal(np.asarray(new), np.asarray(want))


@pytest.mark.parametrize("splits", [4, 1])
def test_hc_post_kernel_adds_the_launches_partials(monkeypatch, splits):
    """The sublayer's output and the FFN's terms as their matmul launches' unfinished outputs
    (``SplitSums``: K-split double-float partials, or one array of rows; a launch's rows past T, as the
    Q8_0 launch's padded tokens): the post-mix kernel adds them per column slice as ``finish`` does,
    so the bits of the XLA path fed the finished values; and via ``hc.hc_post_carry``'s reference."""
    from pallas_kernels.common import SplitSums

    T, k, d = 2, 6, 256

    def partials(rows):
        hi = RNG.standard_normal((splits, rows, d)) * 10.0 ** RNG.integers(-2, 3, (splits, rows, 1))
        lo = hi * RNG.uniform(-(2.0**-25), 2.0**-25, hi.shape)
        arrays = (jnp.asarray(hi.astype(np.float32)),) + ((jnp.asarray(lo.astype(np.float32)),) if splits > 1 else ())
        return SplitSums(arrays, 0, d, rows)

    H = hc_inputs(T, 4, d)[0]
    y = partials(4)  # 4 rows, 2 of them the launch's padding
    y = SplitSums(y.arrays, 0, d, T)
    terms = partials(T * k)
    post = jnp.asarray(RNG.uniform(0.0, 2.0, (T, 4)).astype(np.float32))
    comb = jnp.asarray(RNG.uniform(0.0, 1.0, (T, 4, 4)).astype(np.float32))
    yv, tv = y.value(), terms.value().reshape(T, k, d)
    want = hc.hc_post(H, hc.with_terms(yv, tv), post, comb)
    for args in ((y, terms), (yv, tv), (y, None)):
        new, _ = hc_post.hc_post(H, *args[:1], post, comb, args[1], cols=64, interpret=INTERPRET)
        ref = want if args[1] is not None else hc.hc_post(H, yv, post, comb)
        assert np.array_equal(np.asarray(new), np.asarray(ref))
    # hc_post_carry off the kernel path (XLA finishes them, no squares) and on it where a GPU takes
    # the launch (its squares for the next pre-mix; interpreted, the whole-model dispatch stays on XLA)
    for mode in ("off", "interpret" if INTERPRET else "all"):
        monkeypatch.setenv("DS4JAX_KERNELS", mode)
        new, sq = hc.hc_post_carry(H, y, post, comb, terms)
        assert (sq is not None) == (mode == "all") and np.array_equal(np.asarray(new), np.asarray(want))


@pytest.mark.parametrize("kind,n,K,chunk", [("q8_0", 3, 2048, 1024), ("q8_0", 1, 64, 1024), ("q8_k", 2, 2048, 512)])
def test_quantize_kernel_is_the_reference(kind, n, K, chunk):
    """The quantize launch against ``numerics.quantize_q8_0`` / ``quantize_q8_k``: the same int8
    and scales, with a wide range of magnitudes, ties to the block's max, and one all-zero block."""
    x = RNG.standard_normal((n, K)).astype(np.float32) * np.exp2(RNG.integers(-12, 12, (n, 1)))
    x[0, :32] = 0.0  # a block of zeros: d = 0, q = 0
    x[-1, 40] = -np.abs(x[-1, 32:64]).max()  # the max |x| twice in a block, once negative
    x = jnp.asarray(x)
    got = quantize.quantize(x, kind, chunk=chunk, interpret=INTERPRET)
    want = (quantize_q8_0 if kind == "q8_0" else quantize_q8_k)(x)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert np.array_equal(np.asarray(g), np.asarray(w))


def test_quantize_launch_adds_a_matmuls_split_sums():
    """The quantize launch reading a matmul launch's unfinished outputs (``SplitSums``: 4 K-split
    double-float partials, the columns of the second matrix of three, rows past n the launch's
    padding), as attn_output_b's input after attn_output_a's grouped launch: the bits of
    quantizing the finished rows."""
    from pallas_kernels.common import SplitSums

    S, n, K = 4, 2, 2048
    hi = RNG.standard_normal((S, 4, 3 * K)) * 10.0 ** RNG.integers(-2, 3, (S, 4, 1))
    lo = hi * RNG.uniform(-(2.0**-25), 2.0**-25, hi.shape)
    x = SplitSums((jnp.asarray(hi.astype(np.float32)), jnp.asarray(lo.astype(np.float32))), K, K, n)
    assert quantize.supported(x, "q8_0", chunk=1024) and not quantize.supported(
        SplitSums(x.arrays, 512, K, n), "q8_0", chunk=1024
    )
    got = quantize.quantize(x, "q8_0", chunk=1024, interpret=INTERPRET)
    for g, w in zip(got, quantize_q8_0(x.value())):
        assert g.shape == w.shape and np.array_equal(np.asarray(g), np.asarray(w))


def _lower_for_cuda(fn, *args):
    """StableHLO of ``fn`` for CUDA: every Pallas call lowered (to Triton IR, or Mosaic GPU's) as
    a GPU compile would, on any machine."""
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _expert_call(x, dx, ids, planes, qtype, version):
    cfg = experts.ExpertConfig(block_rows=16, k_splits=2 if version == 3 else 1)
    if version == 3:  # also with f32 activations, quantized in the kernel
        xf = dx.reshape(-1)[:1] + x.astype(jnp.float32)
        return experts.matmul(x, dx, ids, qtype, (planes, planes), cfg), experts.matmul(
            xf, None, ids, qtype, planes, cfg
        )
    return experts.matmul(x, dx, ids, qtype, planes, cfg, version=version)


def test_every_kernel_lowers_for_a_gpu(monkeypatch):
    """Catches what interpret mode cannot: a primitive Triton's lowering lacks (jnp.round was
    one), or a constant captured by a kernel body. The device query (sm_90) is all that needs a GPU."""
    from jax._src.pallas.triton import gpu_info

    monkeypatch.setattr(gpu_info, "get_gpu_info", lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100))
    S = jax.ShapeDtypeStruct
    from pallas_kernels.common import SplitSums

    i8, f32 = jnp.int8, jnp.float32
    # the Q_A/KV_A pair with the KV row's angles: (q_a, its weight, kv_a, its weight, cos, sin)
    kv_pair = (S((1, 1024), f32), S((1024,), f32), S((1, 512), f32), S((512,), f32), S((1, 32), f32), S((1, 32), f32))
    calls = [
        (lambda c: sinkhorn.sinkhorn(c, 20, 1e-6), S((3, 4, 4), f32)),
        (indexer_scores.scores, S((2, 64, 128), f32), S((2, 64), f32), S((1041, 128), jnp.float16)),
        (lambda k, s: compressor_pool.pool(k, s, 4, 2, 512, 2), S((12, 1024), f32), S((12, 1024), f32)),
        (lambda k, s: compressor_pool.pool(k, s, 128, 1, 128, 1), S((128, 128), f32), S((128, 128), f32)),
        *(
            (
                lambda rk, rs, k, s, p, coff=coff: compressor_pool.pool_ring(rk, rs, k, s, p, 4, coff, 512),
                S((4 * coff, 512 * coff), f32),
                S((4 * coff, 512 * coff), f32),
                S((1, 512 * coff), f32),
                S((1, 512 * coff), f32),
                S((), jnp.int32),
            )
            for coff in (1, 2)
        ),
        *(
            (
                lambda r, w, c, s, cache, p, trip=trip: compressor_row.rows_into_cache(
                    r, w, c, s, cache, p, 1, 4, 1e-6, trip
                ),
                S((1, hd), f32),
                S((hd,), f32),
                S((4096, 32), f32),
                S((4096, 32), f32),
                S((1041, hd), jnp.float16),
                S((), jnp.int32),
            )
            for hd, trip in ((512, ("fp8", 448, 64)), (128, ("fp4", 32)))
        ),
        (  # the scores and mix launches, and the epilogue's: the output projection's int8 input
            lambda q, k1, v1, k2, r2, v2, sink, c, s: attention.sink_attention(
                q, ((k1, None, v1), (k2, r2, v2)), sink, 0.0625, quant_rotated=(c, s)
            )[1],
            S((2, 8, 256), f32),
            S((130, 256), jnp.float16),
            S((2, 130), jnp.bool_),
            S((300, 256), jnp.float16),
            S((2, 64), jnp.int32),
            S((2, 64), jnp.bool_),
            S((8,), f32),
            S((2, 32), f32),
            S((2, 32), f32),
        ),
        (  # a prefill chunk's rows against Q8_0 weights on the tensor cores (grouped, in K splits)
            lambda x, dx, q, d: q8_0_rows.matmul(x, dx, q, d, 2),
            S((64, 2 * 1024), i8),
            S((64, 2 * 32), f32),
            S((256, 1024), i8),
            S((256, 32), jnp.float16),
        ),
        (
            lambda H, fn, s, b: hc_pre.hc_pre(H, fn, s, b, 20, 1e-6, 1e-6, gate_columns=4),
            S((2, 4, 1024), f32),
            S((24, 4096), jnp.float16),
            S((3,), f32),
            S((24,), f32),
        ),
        (
            lambda H, fn, s, b: hc_pre.hc_pre(H, fn, s, b, 20, 1e-6, 1e-6),
            S((2, 4, 1024), f32),
            S((24, 4096), jnp.float16),
            S((3,), f32),
            S((24,), f32),
        ),
        (
            lambda H, y, p, c: hc_post.hc_post(H, y, p, c)[1][0],
            S((2, 4, 1024), f32),
            S((2, 1024), f32),
            S((2, 4), f32),
            S((2, 4, 4), f32),
        ),
        (  # the FFN's parts summed in the post-mix
            lambda H, y, p, c, t: hc_post.hc_post(H, y, p, c, t)[0],
            S((2, 4, 1024), f32),
            S((2, 1024), f32),
            S((2, 4), f32),
            S((2, 4, 4), f32),
            S((2, 6, 1024), f32),
        ),
        (  # the mixer reading hc_post's squares
            lambda H, fn, s, b, qs, qe: hc_pre.hc_pre(H, fn, s, b, 20, 1e-6, 1e-6, squares=(qs, qe))[0],
            S((2, 4, 1024), f32),
            S((24, 4096), jnp.float16),
            S((3,), f32),
            S((24,), f32),
            S((2, 8, 4), f32),
            S((2, 8, 4), f32),
        ),
        (
            lambda x, dx, q, d: q8_0.matmul(x, dx, q, d),
            S((1, 256), i8),
            S((1, 8), f32),
            S((64, 256), i8),
            S((64, 8), jnp.float16),
        ),
        (  # two matrices of one K in one launch (a lax.cond picks a program's matrix)
            lambda x, dx, q1, d1, q2, d2: q8_0.matmul(x, dx, (q1, q2), (d1, d2))[1],
            S((1, 256), i8),
            S((1, 8), f32),
            S((64, 256), i8),
            S((64, 8), jnp.float16),
            S((32, 256), i8),
            S((32, 8), jnp.float16),
        ),
        (  # f32 activations, quantized in the kernel
            lambda x, q, d: q8_0.matmul(x, None, q, d, cfg=q8_0.choose_config(64, 2048, n_sm=132)),
            S((3, 2048), f32),
            S((64, 2048), i8),
            S((64, 64), jnp.float16),
        ),
        (
            lambda x, dx, q, d: q8_0.matmul(x, dx, q, d, cfg=q8_0.choose_config(64, 2048, n_sm=132)),
            S((3, 2048), i8),
            S((3, 64), f32),
            S((64, 2048), i8),
            S((64, 64), jnp.float16),
        ),
        (
            lambda x, dx, q, d: q8_0_mosaic.matmul(x, dx, q, d),
            S((2, 512), i8),
            S((2, 16), f32),
            S((16, 64, 32), i8),
            S((16, 64), jnp.float16),
        ),
        (  # the quantize launch adding a grouped launch's K-split partials (attn_output_b's input)
            lambda s, e: quantize.quantize(SplitSums((s, e), 0, 2048, 1), "q8_0")[0],
            S((4, 4, 2048), f32),
            S((4, 4, 2048), f32),
        ),
        (
            lambda a, wa, b, wb: norms.rms_norm_quant(((a, wa, ("q8_0", "q8_k")), (b, wb, ())), 1e-6, chunks=2)[0][1],
            S((2, 512), f32),
            S((512,), f32),
            S((2, 64), f32),
            S((64,), f32),
        ),
        (
            lambda a, wa, b, wb, c, s: norms.rms_norm_quant(
                ((a, wa, ("q8_0",)), (b, wb, ())), 1e-6, chunks=4, kv_row=(c, s, 448, 64)
            )[1][0],
            *kv_pair,
        ),
        (
            lambda a, wa, b, wb, c, s, raw, slot: norms.rms_norm_quant(
                ((a, wa, ("q8_0",)), (b, wb, ())), 1e-6, chunks=4, kv_row=(c, s, 448, 64), ring=(raw, slot)
            )[1][0],
            *kv_pair,
            S((128, 512), jnp.float16),
            S((), jnp.int32),
        ),
        (
            lambda s, e, wa, wb, c, sn: norms.rms_norm_quant(
                ((SplitSums((s, e), 0, 1024, 1), wa, ("q8_0",)), (SplitSums((s, e), 1024, 512, 1), wb, ())),
                1e-6,
                chunks=4,
                kv_row=(c, sn, 448, 64),
            )[1][0],
            S((8, 1, 1536), f32),
            S((8, 1, 1536), f32),
            kv_pair[1],
            kv_pair[3],
            *kv_pair[4:],
        ),
        (lambda x: hadamard.hadamard(x), S((1, 64, 128), f32)),
        (
            lambda x, c, s: hadamard.rope_hadamard_fp4(x, c, s, 32),
            S((2, 64, 128), f32),
            S((2, 32), f32),
            S((2, 32), f32),
        ),
        (
            lambda x, a, b: float_dense.matmul(x, (a, b)),
            S((1, 4096), f32),
            S((1024, 4096), jnp.float16),
            S((1024, 4096), jnp.float16),
        ),
        (lambda x, a: float_dense.matmul(x, a), S((2, 1024), f32), S((8192, 1024), jnp.float16)),
        (lambda x: quantize.quantize(x, "q8_0")[0], S((2, 4096), f32)),
        (lambda x: quantize.quantize(x, "q8_k")[1], S((2, 2048), f32)),
        (  # the shared expert's middle from its gate+up launch's 8 split partials
            lambda s, e: quantize.swiglu_quantize(
                SplitSums((s, e), 0, 2048, 1), SplitSums((s, e), 2048, 2048, 1), 10.0
            ),
            S((8, 1, 4096), f32),
            S((8, 1, 4096), f32),
        ),
        (  # the routed experts' middle (6 pairs) from the expert launch's 4 split partials, weighted
            lambda s, e, w: quantize.swiglu_quantize(
                SplitSums((s, e), 0, 2048, 6), SplitSums((s, e), 2048, 2048, 6), 10.0, w, kind="q8_k"
            ),
            S((4, 6, 4096), f32),
            S((4, 6, 4096), f32),
            S((6,), f32),
        ),
        (  # the post-mix adding attn_output_b's 4 split partials (4 padded token rows) and 8 of the experts'
            lambda h, s, e, ts, te, p, c: hc_post.hc_post(
                h, SplitSums((s, e), 0, 4096, 1), p, c, SplitSums((ts, te), 0, 4096, 6)
            )[0],
            S((1, 4, 4096), f32),
            S((4, 4, 4096), f32),
            S((4, 4, 4096), f32),
            S((8, 6, 4096), f32),
            S((8, 6, 4096), f32),
            S((1, 4), f32),
            S((1, 4, 4), f32),
        ),
        (
            lambda q, c, s: norms.head_norm_rope(q, c, s, 1e-6, heads_per_program=4),
            S((2, 8, 128), f32),
            S((2, 32), f32),
            S((2, 32), f32),
        ),
    ]
    for qtype in (*experts.TYPES, *experts.LAYOUTS):
        planes = expert_planes(jax.random.PRNGKey(0), qtype, 4, 32, 2)
        for version in (1, 3) if qtype in experts.TYPES else (3,):
            fn = functools.partial(_expert_call, qtype=qtype, version=version)
            calls.append((fn, S((3, 512), i8), S((3, 2), f32), S((3,), jnp.int32), planes))
    cfg = dataclasses.replace(q8_0.config_for((4096,), 8192, cores=True), unroll=4)  # Q8_0 steps' loads together
    calls.append(
        (
            lambda x, dx, q, d, cfg=cfg: q8_0.matmul(x, dx, q, d, cfg=cfg),
            S((1, 8192), i8),
            S((1, 256), f32),
            S((4096, 8192), i8),
            S((4096, 256), jnp.float16),
        )
    )
    for qtype in (experts.Q2_K, experts.IQ2_NIB):  # whole-K programs, gate+up as one launch
        planes = expert_planes(jax.random.PRNGKey(0), qtype, 4, 32, 2)
        cfg = experts.ExpertConfig(16, 2, num_warps=4, whole_k=True)
        fn = lambda x, dx, ids, p, qtype=qtype, cfg=cfg: experts.matmul(x, dx, ids, qtype, (p, p), cfg)[1]
        calls.append((fn, S((3, 512), i8), S((3, 2), f32), S((3,), jnp.int32), planes))
    for fn, *args in calls:
        assert "custom_call" in _lower_for_cuda(fn, *args)


def test_dispatch_modes(monkeypatch):
    _, _, qs, d = q8_inputs(2, 64, 256)
    x = jnp.asarray(RNG.standard_normal((2, 256)).astype(np.float32))
    want = np.asarray(q8_0.reference(*quantize_q8_0(x), qs, d))
    _, _, qs2, d2 = q8_inputs(2, 32, 256)
    want2 = np.asarray(q8_0.reference(*quantize_q8_0(x), qs2, d2))
    for m in ("off", "interpret", "auto", "all"):
        monkeypatch.setenv("DS4JAX_KERNELS", m)
        assert np.array_equal(dispatch.q8_0_matmul(x, qs, d), want)
        y, y2 = dispatch.q8_0_matmuls(x, ((qs, d), (qs2, d2)))  # one launch where a kernel runs
        assert np.array_equal(y, want) and np.array_equal(y2, want2)
    # N=2 on the CUDA-core form where K is small enough (Q8_CORES_N2_MAX_K): the same bits
    monkeypatch.setenv("DS4JAX_KERNELS", "interpret")
    monkeypatch.setattr(dispatch, "Q8_CORES_N2_MAX_K", 256)
    seen = []
    real = q8_0.matmul
    monkeypatch.setattr(q8_0, "matmul", lambda *a, **k: seen.append(k.get("cores")) or real(*a, **k))
    assert np.array_equal(dispatch.q8_0_matmul(x, qs, d), want) and seen == [True]
    xg = jnp.asarray(RNG.standard_normal((2, 512)).astype(np.float32))  # a grouped launch keeps the tensor cores
    wantg = np.asarray(q8_0.reference(*quantize_q8_0(xg), qs, d, 2))
    assert np.array_equal(dispatch.q8_0_matmul(xg, qs, d, groups=2), wantg) and seen == [True, False]
    monkeypatch.setenv("DS4JAX_KERNELS", "fast")
    with pytest.raises(DS4Error, match="DS4JAX_KERNELS"):
        dispatch.q8_0_matmul(x, qs, d)


def test_prefill_kernels_take_a_chunks_rows_on_a_gpu_only(monkeypatch):
    """``PREFILL_KERNELS``: the named decode kernels take more than MAX_TOKENS rows on a GPU (faked
    here), the others and any kernel on the CPU keep the reference at those rows (the CPU tests'
    prefill); the compressor rows' kernel is not named (not timed at a chunk's rows)."""
    n = dispatch.MAX_TOKENS + 60
    assert "row" not in dispatch.PREFILL_KERNELS.split("+") and "attention" in dispatch.PREFILL_KERNELS.split("+")
    monkeypatch.setenv("DS4JAX_KERNELS", "auto")
    monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "cpu")  # the test runs on a GPU too
    assert dispatch._use(n, auto=True, any_n=dispatch._prefill("attention")) == (False, False)
    monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "gpu")
    assert dispatch._use(n, auto=True, any_n=dispatch._prefill("attention")) == (True, False)
    assert dispatch._use(n, auto=True, any_n=dispatch._prefill("row")) == (False, False)
    monkeypatch.setattr(dispatch, "PREFILL_KERNELS", "")
    assert dispatch._use(n, auto=True, any_n=dispatch._prefill("attention")) == (False, False)
    assert dispatch._use(1, auto=True, any_n=dispatch._prefill("attention")) == (True, False)  # decode


def test_decode_through_kernels_equals_prefill_bit_for_bit(tiny_files, monkeypatch):
    """Decode (N=1: every Q8_0 and routed-expert matmul and the fused norms a kernel) against
    chunked prefill (N=32: the XLA path): same logits, bit for bit. Off GPU the prefill is traced
    with no kernel at all (the suite's default mode), at the other files' engine shapes
    (conftest's CTX and CHUNK): test_forward's program, from the compilation cache when it ran."""
    from conftest import CHUNK, CTX

    eng = Engine(tiny_files, ctx=CTX, chunk=CHUNK)
    ids = RNG.integers(0, tiny_files.config.n_vocab, 20).astype(np.int32)
    greedy = SamplingParams(temperature=0.0).arrays()
    if INTERPRET:
        monkeypatch.delenv("DS4JAX_KERNELS", raising=False)
    else:
        monkeypatch.setenv("DS4JAX_KERNELS", "all")
    _, pre, _ = eng.prefill(eng.new_state(), ids, greedy, jax.random.key(0), all_logits=True)
    monkeypatch.setenv("DS4JAX_KERNELS", "interpret" if INTERPRET else "all")  # the decode program's trace
    state = eng.new_state()
    for i, t in enumerate(ids):
        _, logits, state = eng.decode(state, int(t), greedy, jax.random.key(0))
        assert np.array_equal(np.asarray(logits), pre[i]), i


@pytest.mark.skipif(INTERPRET, reason="on a GPU only: interpreted, the whole-K programs have their own test above")
def test_decode_through_split_expert_launches_equals_prefill(tiny_files, monkeypatch):
    """The same with the routed experts in their split launches (whole-K programs, the default, off)."""
    for whole in ("Q2K_WHOLE", "NIB_WHOLE", "IQ2_WHOLE", "Q4K_WHOLE"):
        monkeypatch.setattr(experts, whole, 0)
    jax.clear_caches()  # the kernels' traces do not key on module constants
    test_decode_through_kernels_equals_prefill_bit_for_bit(tiny_files, monkeypatch)


@pytest.mark.skipif(INTERPRET, reason="on a GPU only: interpreted, the kernels at N=2 have their own tests above")
def test_prefill_in_pairs_through_kernels_equals_prefill_bit_for_bit(tiny_files, monkeypatch):
    """Chunks of 2 tokens (N=2, as the speculative verifier: every kernel `all` takes at N=2)
    against chunks of 16 (the XLA path): the same logits, bit for bit."""
    monkeypatch.setenv("DS4JAX_KERNELS", "all")
    ids = RNG.integers(0, tiny_files.config.n_vocab, 12).astype(np.int32)
    greedy = SamplingParams(temperature=0.0).arrays()
    logits = []
    for chunk in (16, 2):
        eng = Engine(tiny_files, ctx=64, chunk=chunk)
        _, rows, _ = eng.prefill(eng.new_state(), ids, greedy, jax.random.key(0), all_logits=True)
        logits.append(np.asarray(rows))
    assert logits[0].shape == logits[1].shape == (len(ids), tiny_files.config.n_vocab)
    assert np.array_equal(logits[0], logits[1])


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("rows,block_k,splits", [(8, 128, 1), (4, 64, 2)])
def test_float_matmul_kernel_is_the_reference(n, rows, block_k, splits):
    """Float-weight matmuls (F16 weights, f32 rows), several matrices of one K in one launch,
    against ``numerics.adot``, bit for bit at every N; a row's bits do not depend on N. Weights
    and activations of wide range, so the double-float sums meet cancellations."""
    K = 512
    ws = tuple(
        jnp.asarray((RNG.standard_normal((o, K)) * np.exp2(RNG.integers(-6, 3, (o, 1)))).astype(np.float16))
        for o in (64, 32, 16)
    )
    x = jnp.asarray((RNG.standard_normal((n, K)) * np.exp2(RNG.integers(-4, 4, (1, K)))).astype(np.float32))
    cfg = float_dense.FloatConfig(block_rows=rows, block_k=block_k, k_splits=splits)
    got = float_dense.matmul(x, ws, cfg, interpret=INTERPRET)
    for g, w in zip(got, ws):
        assert g.shape == (n, w.shape[0]) and np.array_equal(np.asarray(g), np.asarray(float_dense.reference(x, w)))
    one = float_dense.matmul(x[:1], ws[0], cfg, interpret=INTERPRET)
    assert np.array_equal(np.asarray(one), np.asarray(got[0][:1]))
    assert float_dense.choose_config((1024, 1024), 4096) == float_dense.FloatConfig(16, 256, 4, 8)
    assert float_dense.choose_config((8192,), 1024) == float_dense.FloatConfig(8, 128, 1, 4)


@pytest.mark.parametrize("T,splits", [(1, 4), (3, 2), (1, 1)])
def test_norm_launch_adds_a_matmuls_split_sums(T, splits):
    """The Q_A/KV_A pair's Q8_0 launch left unfinished (``SplitSums``: its K-split partials, or its
    rows with no split) and read by the norms' launch, which adds them as ``finish`` does: the
    normed rows, their quantization and the KV row with the bits of the finished outputs; the same
    launch's finished outputs equal the partials' value."""
    from pallas_kernels.common import SplitSums, TileConfig

    xq, dx, qa_qs, qa_d = q8_inputs(T, 128, 512)
    _, _, kv_qs, kv_d = q8_inputs(T, 64, 512)
    cfg = TileConfig(block_rows=32, k_splits=splits, blocks_per_step=4, cores=True)
    mats = ((qa_qs, kv_qs), (qa_d, kv_d))
    sums = q8_0.matmul(xq, dx, *mats, cfg=cfg, interpret=INTERPRET, raw=True)
    rows = q8_0.matmul(xq, dx, *mats, cfg=cfg, interpret=INTERPRET)
    assert all(isinstance(p, SplitSums) and len(p.arrays) == (1 if splits == 1 else 2) for p in sums)
    for p, r in zip(sums, rows):
        assert p.shape == r.shape and np.array_equal(np.asarray(p.value()), np.asarray(r))
    wa, wb = (jnp.asarray(RNG.uniform(0.2, 3.0, n).astype(np.float32)) for n in (128, 64))
    ang = RNG.uniform(0, 6, (T, 8)).astype(np.float32)
    cos, sin = jnp.asarray(np.cos(ang)), jnp.asarray(np.sin(ang))
    kv_row = (cos, sin, 32, 16)
    lazy = ((sums[0], wa, ("q8_0",)), (sums[1], wb, ()))
    done = ((rows[0], wa, ("q8_0",)), (rows[1], wb, ()))
    assert norms.quant_supported(lazy, 2, (32, 16, 8))
    got = norms.rms_norm_quant(lazy, 1e-6, chunks=2, interpret=INTERPRET, kv_row=kv_row)
    want = norms.rms_norm_quant(done, 1e-6, chunks=2, interpret=INTERPRET, kv_row=kv_row)
    _same_norms(got[:1], want[:1])
    assert np.array_equal(np.asarray(got[1][0]).view(np.uint16), np.asarray(want[1][0]).view(np.uint16))


@pytest.mark.parametrize("T,splits", [(1, 4), (3, 2), (2, 1)])
def test_swiglu_quantize_launch_is_the_reference(T, splits):
    """The shared expert's middle as one launch: a gate+up Q8_0 launch's outputs (``SplitSums``: its
    K-split partials, or its rows with no split), or finished f32 rows, to
    ``quantize_q8_0(swiglu(g, u, clamp))``, bit for bit; values past the clamp on both sides."""
    from pallas_kernels.common import SplitSums, TileConfig

    xq, dx, g_qs, g_d = q8_inputs(T, 64, 512)
    _, _, u_qs, u_d = q8_inputs(T, 64, 512)
    dx = dx.at[1:].multiply(0.01)  # token 0's gates reach past ±88.7 (exp's range), the others' do not
    cfg = TileConfig(block_rows=32, k_splits=splits, blocks_per_step=4, cores=True)
    mats = ((g_qs, u_qs), (g_d, u_d))
    sums = q8_0.matmul(xq, dx, *mats, cfg=cfg, interpret=INTERPRET, raw=True)
    g, u = q8_0.matmul(xq, dx, *mats, cfg=cfg, interpret=INTERPRET)
    assert all(isinstance(s, SplitSums) for s in sums)
    clamp = float(np.quantile(np.abs(np.asarray(g)), 0.7))  # some of both past the clamp
    want = quantize_q8_0(swiglu(g, u, clamp))
    assert quantize.swiglu_supported(*sums, chunk=32)
    for args in (sums, (g, u)):
        got = quantize.swiglu_quantize(*args, clamp, chunk=32, interpret=INTERPRET)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("splits", [2, 1])
def test_routed_swiglu_quantize_launch_is_the_reference(splits):
    """The routed experts' middle as one launch: the gate+up expert launch's outputs (``SplitSums`` of
    its T·k rows: K-split partials or finished rows), or finished f32 rows, to ``quantize_q8_k`` of
    ``swiglu(g, u, clamp)`` times each row's router weight, bit for bit; a row of weight 0 and gates
    past exp's range. Then the dispatch's pair: the down kernel reading those blocks as the reference."""
    from pallas_kernels.common import SplitSums

    E, out, nb = 6, 512, 2  # the middle of 512: two Q8_K blocks a row
    gate, up = (expert_planes(jax.random.PRNGKey(s), experts.IQ2_XXS, E, out, nb) for s in (11, 12))
    ids = jnp.asarray([[5, 0, 3], [3, 1, 5]], jnp.int32)
    x = RNG.standard_normal((6, nb * 256)).astype(np.float32)
    x[0] *= 40  # the first pair's gates reach past ±88.7
    xq, dx = quantize_q8_k(jnp.asarray(x))
    cfg = experts.ExpertConfig(block_rows=16, k_splits=splits)
    sums = experts.matmul(xq, dx, ids.reshape(-1), experts.IQ2_XXS, (gate, up), cfg, interpret=INTERPRET, raw=True)
    g, u = experts.matmul(xq, dx, ids.reshape(-1), experts.IQ2_XXS, (gate, up), cfg, interpret=INTERPRET)
    assert all(isinstance(s, SplitSums) for s in sums) and np.abs(np.asarray(g[0])).max() > 88.7
    clamp = float(np.quantile(np.abs(np.asarray(g)), 0.7))
    wt = jnp.asarray(RNG.uniform(0.05, 2.0, 6).astype(np.float32)).at[4].set(0.0)
    want = quantize_q8_k(swiglu(g, u, clamp) * wt[:, None])
    assert not np.asarray(want[1])[4].any() and np.asarray(want[1])[[0, 1, 2, 3, 5]].all()
    assert quantize.swiglu_supported(*sums, kind="q8_k") and not quantize.swiglu_supported(
        g[:, :128], u[:, :128], kind="q8_k"
    )
    for args in (sums, (g, u)):
        got = quantize.swiglu_quantize(*args, clamp, wt, kind="q8_k", interpret=INTERPRET)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(np.asarray(a), np.asarray(b))
    down = expert_planes(jax.random.PRNGKey(13), experts.Q2_K, E, 256, out // 256)
    ys = dispatch.expert_matmul(jnp.zeros((2, 3, out), jnp.float32), experts.Q2_K, down, ids, pre={"q8_k": want})
    ref = experts.reference(*want, experts.Q2_K, down, ids.reshape(-1))
    assert np.array_equal(np.asarray(ys).reshape(6, -1), np.asarray(ref))


def test_register_cap_reaches_the_named_kernels_triton_module(monkeypatch):
    """``registers.MAXNREG`` puts Triton's ``ttg.maxnreg`` on the named kernel's module only (the
    GPU lowering, read on the CPU: whether it pays is for the GPU)."""
    from jax._src.pallas.triton import gpu_info, lowering

    from pallas_kernels import registers

    monkeypatch.setattr(gpu_info, "get_gpu_info", lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100))
    registers.install()
    registers.install()  # once only: the second is a no-op
    seen: list[str] = []
    capped = lowering.lower_jaxpr_to_triton_module
    assert capped.ds4jax_capped and not getattr(capped.__wrapped__, "ds4jax_capped", False)

    def capture(*a, **k):
        res = capped(*a, **k)
        seen.append(res.module.operation.get_asm())
        return res

    monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", capture)
    S = jax.ShapeDtypeStruct
    planes = {n: S(p.shape, p.dtype) for n, p in expert_planes(jax.random.PRNGKey(0), experts.Q2_K, 8, 256, 2).items()}
    cfg = experts.choose_config(experts.Q2_K, 256, 2)
    args = (S((6, 512), jnp.int8), S((6, 2), jnp.float32), S((6,), jnp.int32), planes)

    q8_args = (S((1, 512), jnp.int8), S((1, 16), jnp.float32), S((64, 512), jnp.int8), S((64, 16), jnp.float16))

    def lower_both():  # {kernel name: whether its module carries the cap}
        seen.clear()
        jax.jit(lambda x, dx, ids, p: experts.matmul(x, dx, ids, experts.Q2_K, p, cfg)).trace(*args).lower(
            lowering_platforms=("cuda",)
        )
        jax.jit(q8_0.matmul).trace(*q8_args).lower(lowering_platforms=("cuda",))
        return {m.split("@")[1].split()[0]: "ttg.maxnreg" in m for m in seen}

    monkeypatch.setattr(registers, "MAXNREG", "")
    assert not any(lower_both().values())
    monkeypatch.setattr(registers, "MAXNREG", f"experts_{experts.Q2_K}:64")
    got = lower_both()
    assert got[f"experts_{experts.Q2_K}"] and sum(got.values()) == 1, got
    assert "ttg.maxnreg = 64 : i32" in next(m for m in seen if f"@experts_{experts.Q2_K}" in m)
    for bad in ("experts_10", "experts_10:8", ":64", "experts_10:x"):
        with pytest.raises(ValueError):
            registers.caps(bad)
    assert registers.caps("a:64+b_1:96") == {"a": 64, "b_1": 96}
