"""Load-time layouts (ds4jax/quant/layouts.py): the same integer weights, so the same bits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ds4jax.engine import Engine
from ds4jax.errors import DS4Error
from ds4jax.model.moe import ffn_sublayer
from ds4jax.quant import layouts
from ds4jax.quant.formats import QType
from ds4jax.quant.jnp_decode import dequantize
from ds4jax.quant.planes import QTensor
from ds4jax.weights import load_weights
from pallas_kernels.testing import expert_planes

RNG = np.random.default_rng(11)


def _iq2(E=3, out=16, nb=2, seed=0) -> QTensor:
    planes = expert_planes(jax.random.PRNGKey(seed), QType.IQ2_XXS, E, out, nb)
    return QTensor(int(QType.IQ2_XXS), (E, out, nb * 256), planes)


def test_iq2_nib_dequantizes_to_the_same_floats():
    qt = _iq2()
    nib = QTensor(layouts.IQ2_NIB, qt.shape, layouts.iq2_nib_planes(qt.planes))
    assert np.array_equal(np.asarray(dequantize(nib)).view(np.uint32), np.asarray(dequantize(qt)).view(np.uint32))
    assert nib.nbytes == 3 * 16 * 2 * (128 + 8 + 2)  # 138 bytes a super-block (IQ2_XXS: 66)
    assert "layout 0x1010" in repr(nib)


def test_nib_conversion_a_few_experts_at_a_time_gives_the_same_planes(monkeypatch):
    """The load-time conversion goes through the experts a few at a time (its temporaries at once
    ran an H200 out of memory); with a step that does not divide the experts, the same planes."""
    qt = _iq2(E=5, seed=4)
    monkeypatch.setattr(layouts, "_EXPERTS_A_STEP", 2)
    got = jax.jit(layouts._iq2_nib_planes_stepwise)(dict(qt.planes))
    want = layouts.iq2_nib_planes(qt.planes)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def test_with_expert_layout_converts_only_iq2_gate_and_up():
    gate, up = _iq2(seed=1), _iq2(seed=2)
    down = QTensor(int(QType.Q2_K), (3, 16, 512), expert_planes(jax.random.PRNGKey(3), QType.Q2_K, 3, 16, 2))
    w = {"layers": ({"ffn_gate_exps": gate, "ffn_up_exps": up, "ffn_down_exps": down},), "output": down}
    assert layouts.with_expert_layout(w, "gguf") is w
    got = layouts.with_expert_layout(w, "nib")
    layer = got["layers"][0]
    assert layer["ffn_gate_exps"].qtype == layer["ffn_up_exps"].qtype == layouts.IQ2_NIB
    assert layer["ffn_down_exps"] is down and got["output"] is down
    assert w["layers"][0]["ffn_gate_exps"] is gate  # not donated: the input stays usable
    assert np.array_equal(dequantize(layer["ffn_up_exps"]), dequantize(up))
    with pytest.raises(DS4Error, match="expert_layout"):
        layouts.with_expert_layout(w, "nibbles")
    # a memory budget: tensors in layer order while they fit (a copy adds all 138 bytes a
    # super-block, a donated conversion 138 - 66), the rest stay IQ2_XXS
    one = 3 * 16 * 2 * 138
    for budget, want in ((one - 1, 0), (one, 1), (2 * one, 2)):
        assert layouts.expert_layout_counts(layouts.with_expert_layout(w, "nib", budget=budget)) == (want, 2)
    part = layouts.with_expert_layout(w, "nib", budget=one)["layers"][0]
    assert part["ffn_gate_exps"].qtype == layouts.IQ2_NIB and part["ffn_up_exps"] is up
    donated = layouts.with_expert_layout(
        {"layers": ({"ffn_gate_exps": _iq2(seed=1), "ffn_up_exps": _iq2(seed=2)},)},
        "nib",
        donate=True,
        budget=2 * 3 * 16 * 2 * (138 - 66),
    )
    assert layouts.expert_layout_counts(donated) == (2, 2)
    if jax.default_backend() == "cpu":
        assert layouts.memory_headroom() is None  # the CPU's allocator does not say


def test_model_ffn_with_nibble_experts_is_bit_identical(tiny_files):
    """The tiny model (IQ2_XXS gate/up experts): an engine asked for nibbles holds them, and the
    model's FFN sublayer gives the same bits with them (the whole model's logits then follow;
    an FFN compiles in seconds where the model takes ~20 s a program on 2 cores)."""
    eng = Engine(tiny_files, ctx=32, chunk=16, expert_layout="nib")
    assert all(w["ffn_gate_exps"].qtype == layouts.IQ2_NIB for w in eng.weights["layers"])
    cfg = eng.cfg
    stored = load_weights(tiny_files)
    L = cfg.n_layer - 1  # a top-k routed layer (the first ones route by token hash)
    z = jnp.asarray(RNG.standard_normal((3, cfg.n_embd)).astype(np.float32))
    tokens = jnp.asarray(RNG.integers(0, cfg.n_vocab, 3), jnp.int32)
    ffn = jax.jit(lambda w, z, t: ffn_sublayer(cfg, L, w, z, t))
    want = np.asarray(ffn(stored["layers"][L], z, tokens))
    got = np.asarray(ffn(eng.weights["layers"][L], z, tokens))
    assert np.isfinite(want).all() and np.array_equal(got, want)


def test_weights_repacked_as_they_load(tiny_files, monkeypatch):
    """``load_weights(expert_layout="nib")`` converts each routed gate/up tensor as it arrives (a model
    that fills the device cannot be converted after: session 33): the same planes as converting the
    loaded weights; with a memory budget, tensors in layer order while their planes fit beside what
    is still to come and ``keep_free``, the rest stay IQ2_XXS."""
    stored = load_weights(tiny_files)
    want = layouts.with_expert_layout(stored, "nib")
    got = load_weights(tiny_files, expert_layout="nib")
    n_gate_up = 2 * sum("ffn_gate_exps" in w for w in stored["layers"])
    assert layouts.expert_layout_counts(got) == (n_gate_up, n_gate_up)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.shape == b.shape and np.array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    # a device that says how much it has left: room for exactly two tensors' new planes
    gate = stored["layers"][0]["ffn_gate_exps"]
    room = 2 * layouts._nib_nbytes(gate) + 50 + 100
    done = []
    real = layouts._convert
    monkeypatch.setattr(
        layouts, "_convert", lambda qt, donate: done.append(layouts._nib_nbytes(qt)) or real(qt, donate)
    )
    monkeypatch.setattr(layouts, "memory_headroom", lambda reserve=0: room - reserve - sum(done))
    part = layouts.Repacker("nib", remaining=0, keep_free=50)
    kinds = [
        part(n, qt).qtype for w in stored["layers"] for n, qt in w.items() if n in ("ffn_gate_exps", "ffn_up_exps")
    ]
    assert kinds[:2] == [layouts.IQ2_NIB] * 2 and set(kinds[2:]) == {int(QType.IQ2_XXS)}
    # bytes still to come count against the room
    done.clear()
    assert (
        layouts.Repacker("nib", remaining=gate.nbytes + room, keep_free=50)("ffn_gate_exps", gate).qtype == gate.qtype
    )
    with pytest.raises(DS4Error, match="expert_layout"):
        layouts.Repacker("nibbles", 0)
