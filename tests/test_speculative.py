"""The combined-forward N=2 verifier: exact greedy output and exact state after accept/reject (the MTP
drafter and its one-program speculative step: test_mtp.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_forward import _assert_same_state, _visible_state

from ds4jax.sampling import SamplingParams
from ds4jax.speculative import SpeculativeDecoder, oracle_drafter

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def spec(engine):
    return SpeculativeDecoder(engine)  # the shared engine: test_forward's programs, when it ran here


@pytest.fixture(scope="module")
def prompt(tiny_files):
    return np.random.default_rng(5).integers(0, tiny_files.config.n_vocab, 45).tolist()


@pytest.fixture(scope="module")
def plain(spec, prompt):
    """Plain greedy decoding's 40 tokens, step by step through the N=1 decode program that the
    verifier's plain steps run (test_forward checks it against generate's programs)."""
    eng = spec.engine
    params, key = GREEDY.arrays(), jax.random.key(0)
    tok, _, state = eng.prefill(eng.new_state(), prompt, params, key)
    out = [int(tok)]
    while len(out) < 40:
        tok, _, state = eng.decode(state, out[-1], params, key)
        out.append(int(tok))
    return out


def divergences(a, b):
    return [(i, x, y) for i, (x, y) in enumerate(zip(a, b)) if x != y]


@pytest.mark.parametrize("wrong_every", [0, 3, 1])
def test_output_equals_plain_greedy(spec, prompt, plain, wrong_every):
    g = spec.generate(prompt, 40, oracle_drafter(prompt + plain, wrong_every))
    assert not divergences(g.tokens, plain), divergences(g.tokens, plain)[:5]
    assert len(g.tokens) == len(plain)
    s = g.stats
    if wrong_every == 0:
        assert s.accepted == s.proposed > 0
    elif wrong_every == 1:
        assert s.accepted == 0 and s.proposed > 0
    else:
        assert 0 < s.accepted < s.proposed
    # Bookkeeping: every verify step commits 1 or 2 tokens, every plain step 1.
    assert len(g.tokens) - 1 == s.verify_steps + s.accepted + s.plain_steps


def test_state_after_accept_and_reject_equals_plain_decode(spec, prompt, plain):
    eng = spec.engine
    cfg = eng.cfg
    params, key = GREEDY.arrays(), jax.random.key(0)

    def prefilled():
        _, _, st = eng.prefill(eng.new_state(), prompt, params, key)
        return st

    t0, t1, t2 = plain[:3]
    # Plain: decode t0, then t1.
    st = prefilled()
    _, l0, st = eng.decode(st, t0, params, key)
    after_t0 = _visible_state(cfg, st)
    _, l1, st = eng.decode(st, t1, params, key)
    after_t1 = _visible_state(cfg, st)
    # Rejected draft: only t0 is committed, row 0's logits are the plain ones.
    wrong = (t1 + 7) % cfg.n_vocab
    n, nxt, logits, _, st = spec._verify(eng.weights, prefilled(), jnp.asarray([t0, wrong], jnp.int32))
    assert int(n) == 1 and int(nxt) == t1
    assert np.array_equal(np.asarray(logits[0]), np.asarray(l0))
    _assert_same_state(_visible_state(cfg, st), after_t0)
    # Accepted draft: both committed, both rows equal the plain logits.
    n, nxt, logits, _, st = spec._verify(eng.weights, prefilled(), jnp.asarray([t0, t1], jnp.int32))
    assert int(n) == 2 and int(nxt) == t2
    assert np.array_equal(np.asarray(logits[1]), np.asarray(l1))
    _assert_same_state(_visible_state(cfg, st), after_t1)
