"""The prefill as one program per kind of block (``ds4jax.layered_prefill``) against the whole-model
program: the same logits, state and hidden row; and the full-size model's blocks in 4 programs."""

import functools

import jax
import numpy as np

from ds4jax.engine import Engine
from ds4jax.layered_prefill import EMBED, HEAD_ALL, LayeredPrefill
from ds4jax.sampling import SamplingParams


def test_layered_prefill_gives_the_whole_programs_bits(engine, tiny_files):
    """Chunks of the shared engine's size, the last one partial, from an empty state and again on
    top of it (the second prompt starts mid-chunk): every logits row, the state and the last row's
    HC state equal the whole-model program's."""
    weights = {k: v for k, v in engine.weights.items() if k != "rope"}
    make = functools.partial(Engine, tiny_files, ctx=engine.ctx, chunk=engine.chunk, weights=weights)
    # the shared engine where it runs one program (the CPU's default); on a GPU it is layered
    whole = make(layered_prefill=False) if engine.layered_prefill else engine
    layered = make(layered_prefill=True)
    assert layered.program_names("prefill_all") == [
        EMBED,
        "prefill.layer0",
        "prefill.layer1",
        "prefill.layer2",
        HEAD_ALL,
    ]
    rng = np.random.default_rng(11)
    first, second = (rng.integers(0, engine.cfg.n_vocab, n).tolist() for n in (45, 30))
    p, key = SamplingParams(temperature=0.0).arrays(), jax.random.key(0)
    runs = []
    for eng in (whole, layered):
        tok1, logits1, state = eng.prefill(eng.new_state(), first, p, key, all_logits=True)
        tok2, logits2, state = eng.prefill(state, second, p, key, all_logits=True)
        runs.append(
            (int(tok1), int(tok2), logits1, logits2, jax.tree.map(np.asarray, state), np.asarray(eng.last_hidden))
        )
    (a, b) = runs
    assert a[:2] == b[:2]
    for x, y in zip(a[2:4], b[2:4]):
        np.testing.assert_array_equal(x, y)
    assert int(b[4]["n_tokens"]) == 75
    for x, y in zip(jax.tree.leaves(a[4]), jax.tree.leaves(b[4])):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a[5], b[5])


def test_full_size_blocks_share_four_programs():
    """DeepSeek V4 Flash's 43 blocks: the two first, the hash-routed ratio-4 block, then the
    ratio-128 and ratio-4 blocks in turn (abstract weights: nothing is made)."""
    from ds4jax.model.rope import rope_tables
    from ds4jax.presets import load_preset, preset_config
    from ds4jax.random_weights import random_weights
    from ds4jax.state import init_state

    p = load_preset("flash-q2")
    cfg = preset_config(p)
    w = jax.eval_shape(functools.partial(random_weights, cfg, p))
    w["rope"] = rope_tables(cfg, 4096)  # host tables, as the engine puts them on the device
    lp = LayeredPrefill(cfg, w, jax.eval_shape(lambda: init_state(cfg, 4096, 64)), 64)
    names = lp.program_of
    assert names[:3] == ["prefill.layer0", "prefill.layer0", "prefill.layer1"]
    assert set(names[3::2]) == {"prefill.layer2"} and set(names[4::2]) == {"prefill.layer3"}
    assert lp.names(all_logits=False)[1:-1] == [f"prefill.layer{i}" for i in range(4)]
