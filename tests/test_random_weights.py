"""Random on-device weights (full-size benchmarks) have the loader's pytree, shapes and dtypes."""

import jax
import numpy as np
import pytest

from ds4jax.errors import DS4Error
from ds4jax.presets import load_preset, preset_config, with_layers
from ds4jax.quant import QType, pack, tensor_nbytes
from ds4jax.random_weights import bytes_per_token, plane_specs, random_weights
from ds4jax.weights import load_weights


def _layout(tree):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, [(np.shape(x), np.dtype(x.dtype)) for x in leaves]


def test_random_weights_repack_the_experts_as_made():
    """``expert_layout="nib"``: each routed gate/up tensor converted as it is made (the whole model as
    nibbles fits an H200 only that way: session 33), the same planes as converting after."""
    from ds4jax.quant import layouts

    p = load_preset("tiny")
    cfg = preset_config(p)
    want = layouts.with_expert_layout(random_weights(cfg, p, seed=3), "nib")
    got = random_weights(cfg, p, seed=3, expert_layout="nib")
    assert layouts.expert_layout_counts(got)[0] == layouts.expert_layout_counts(want)[0] > 0
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def test_random_weights_count_every_tensor_to_come(monkeypatch):
    """The repack's room is what the device has less every tensor still to be made, the MTP block's
    too (without them a 43-layer model with its MTP block ran out of memory: session 33)."""
    from ds4jax import random_weights as module
    from ds4jax.quant import layouts
    from ds4jax.quant.planes import tree_nbytes

    seen = []

    class Spy(layouts.Repacker):
        def __init__(self, layout, remaining, keep_free=0):
            seen.append(remaining)
            super().__init__(layout, remaining, keep_free)

    monkeypatch.setattr(module, "Repacker", Spy)
    p = load_preset("tiny")
    w = random_weights(preset_config(p), p, mtp=True)
    assert seen == [tree_nbytes(w)] and tree_nbytes(w["mtp"]) > 0


def test_random_weights_have_the_loaders_layout(tiny_files):
    p = load_preset("tiny")
    want = load_weights(tiny_files, to_device=False)
    got = random_weights(preset_config(p), p, seed=1, mtp=True)
    assert _layout(got) == _layout(want)
    # the plain tensors' values are in range: hash ids are experts, norms near 1, all finite
    n_expert = tiny_files.config.n_expert
    ids = np.asarray(got["layers"][0]["ffn_gate_tid2eid"].planes["w"])
    assert ids.min() >= 0 and ids.max() < n_expert and len(np.unique(ids)) > 1
    norm = np.asarray(got["layers"][0]["attn_norm"].planes["w"])
    assert np.all(np.abs(norm - 1) < 0.2)
    for leaf in jax.tree_util.tree_leaves(got):
        if np.issubdtype(leaf.dtype, np.floating):
            assert np.isfinite(np.asarray(leaf, np.float32)).all()


@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q2_K, QType.Q4_K, QType.IQ2_XXS, QType.F16, QType.I32])
def test_plane_specs_match_pack(qtype):
    shape = (3, 2, 512)
    raw = np.random.default_rng(0).integers(0, 256, tensor_nbytes(qtype, shape), dtype=np.uint8)
    planes = pack(raw, qtype, shape).planes
    specs = plane_specs(qtype, shape)
    assert {k: (v.shape, v.dtype) for k, v in planes.items()} == {k: (s.shape, s.dtype) for k, s in specs.items()}


def test_with_layers_cuts_the_per_layer_lists():
    p = with_layers(load_preset("flash-q2"), 4)
    cfg = preset_config(p)
    assert cfg.n_layer == 4 and cfg.compress_ratios == (0, 0, 4, 128) and len(cfg.swiglu_clamp) == 4
    with pytest.raises(DS4Error, match="--layers"):
        with_layers(load_preset("flash-q2"), 44)


def test_bytes_per_token_counts_the_read_experts_only(tiny_files):
    cfg = tiny_files.config
    w = load_weights(tiny_files, to_device=False)
    tensors = [(k, t) for k, t in w.items() if k not in ("layers", "mtp")]
    tensors += [(k, t) for layer in w["layers"] for k, t in layer.items()]
    experts = sum(t.nbytes for k, t in tensors if k.endswith("_exps"))
    per_vocab = sum(t.nbytes for k, t in tensors if k in ("token_embd", "ffn_gate_tid2eid"))
    dense = sum(t.nbytes for _, t in tensors) - experts - per_vocab
    got = bytes_per_token(w, cfg)
    # dense weights whole, 6 of the experts, a row of the embedding and of the id tables
    assert dense + experts * cfg.n_expert_used // cfg.n_expert <= got
    assert got <= dense + experts * cfg.n_expert_used / cfg.n_expert + per_vocab / cfg.n_vocab + 1
