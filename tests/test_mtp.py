"""MTP speculative decoding: the draft step against the float64 reference and its positioned
window, the one-program speculative step (drafting at every step or never) against plain greedy
decoding, and the speculative CLI against the strict one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CHUNK, CTX
from test_forward import _assert_outputs_aliased
from test_speculative import divergences

from ds4jax.engine import Engine
from ds4jax.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def prompt(tiny_files):
    return np.random.default_rng(5).integers(0, tiny_files.config.n_vocab, 45).tolist()


@pytest.fixture(scope="module")
def mtp_decoders(engine):
    from ds4jax.speculative import MTPSpeculativeDecoder

    # (the shared engine: test_forward's programs, when it ran in this process)
    return {m: MTPSpeculativeDecoder(engine, margin=m) for m in (0.0, 1e9)}


@pytest.mark.parametrize("seed", [5, 6])
def test_mtp_combined_output_equals_plain_greedy(tiny_files, engine, mtp_decoders, seed):
    prompt = np.random.default_rng(seed).integers(0, tiny_files.config.n_vocab, 37 + seed).tolist()
    plain = engine.generate(prompt, 24, GREEDY).tokens
    assert mtp_decoders[0.0].steps_per_call == engine.steps_per_call == 4  # the engine's: a loop of 4 a call
    # compile() builds what generate runs (the prefill, the first draft, the step) for their shapes,
    # side by side: generate then compiles nothing, so no compile is in its timings
    mtp_decoders[0.0].compile()
    compiled = (dict(engine.compile_s), mtp_decoders[0.0].compile_s)
    always = mtp_decoders[0.0].generate(prompt, 24)
    assert (dict(engine.compile_s), mtp_decoders[0.0].compile_s) == compiled
    never = mtp_decoders[1e9].generate(prompt, 24)
    assert not divergences(always.tokens, plain), divergences(always.tokens, plain)[:5]
    assert not divergences(never.tokens, plain)
    assert len(always.tokens) == len(never.tokens) == 24
    # margin 0 drafts at every step that has room; an infinite margin never drafts
    assert always.stats.proposed == always.stats.verify_steps > 0 and never.stats.proposed == 0
    assert never.stats.plain_steps == 23
    assert len(never.stats.step_s) == 23 and min(never.stats.step_s) > 0  # each step read, timed
    s = always.stats
    assert len(always.tokens) - 1 == s.verify_steps + s.accepted + s.plain_steps


def test_bench_with_mtp_generates_plain_greedy_tokens(engine, mtp_decoders):
    """The bench's speculative generation from each frontier's state (``continue_from`` on a copy of
    it) commits plain greedy decoding's tokens (here: this file's step program, compiled once)."""
    from ds4jax.bench import run_bench

    ids = np.random.default_rng(4).integers(0, engine.cfg.n_vocab, 120).tolist()
    rows = run_bench(engine, ids, [50, 90], 6, spec=mtp_decoders[0.0], warmup=False)  # every step verifies
    for r in rows:
        assert r.tokens == engine.generate(ids[: r.ctx_tokens], 7, GREEDY).tokens
        proposed, accepted, verify, plain = r.drafts
        assert verify >= 1 and proposed == verify and accepted <= proposed and r.gen_tokens == 6
        assert len(r.step_s) == verify + plain and min(r.step_s) > 0


@pytest.mark.parametrize("steps", [1, 4])
def test_mtp_step_writes_every_output_in_place(engine, steps):
    """Every output of the speculative program (one step a call, or a loop of four) takes a
    donated input's buffer (none moves between calls, so XLA need not update the CUDA-graph
    nodes that write it)."""
    from ds4jax.mtp import init_mtp_state
    from ds4jax.speculative import lower_step, step_io

    eng = engine
    io = step_io(1, 2, 0.0, 3.0, CTX, steps)
    low = lower_step(eng, jax.eval_shape(eng.new_state), init_mtp_state(eng.cfg), io)
    _assert_outputs_aliased(low)
    assert low.out_info[2]["reports"].shape == (steps, 4)


def test_mtp_steps_per_call_must_be_positive(engine):
    from ds4jax.errors import DS4Error
    from ds4jax.speculative import MTPSpeculativeDecoder, step_io

    with pytest.raises(DS4Error, match="--steps_per_call must be >= 1"):
        MTPSpeculativeDecoder(engine, steps_per_call=0)
    with pytest.raises(DS4Error, match="steps a call must be >= 1"):
        step_io(1, 2, 0.0, 3.0, CTX, 0)


def test_mtp_draft_step_state_and_holes(engine):
    """The MTP window keeps each row at its position; positions it never ran are holes."""
    import jax

    from ds4jax.mtp import draft_step, init_mtp_state

    eng = engine
    cfg = eng.cfg
    st = init_mtp_state(cfg)
    h = jnp.asarray(np.random.default_rng(0).standard_normal((cfg.n_hc, cfg.n_embd)), jnp.float32)
    # (the weights as an argument: closed over, they would be the program's constants, 100 MB to compile
    # and cache)
    jitted = jax.jit(lambda w, s, t, p: draft_step(cfg, w, s, h, t, p))
    step = lambda s, t, p: jitted(eng.weights, s, t, p)
    l1, _, st1 = step(st, jnp.int32(7), jnp.int32(10))
    assert np.asarray(st1["ring_pos"]).tolist().count(10) == 1
    # Running position 12 with or without a row at 11 differs only through that row;
    # a stale row for 12 - n_swa is not visible to position 12.
    _, _, st2 = step(st1, jnp.int32(8), jnp.int32(12))
    ring_pos = np.asarray(st2["ring_pos"])
    assert sorted(ring_pos[ring_pos >= 0].tolist()) == [10, 12]
    far, _, _ = step(st2, jnp.int32(9), jnp.int32(12 + cfg.n_swa + 5))  # all stored rows out of the window
    alone, _, _ = step(init_mtp_state(cfg), jnp.int32(9), jnp.int32(12 + cfg.n_swa + 5))
    assert np.array_equal(np.asarray(far), np.asarray(alone))
    assert np.all(np.isfinite(np.asarray(l1)))


def test_cli_speculative_and_strict_agree(tiny_paths, prompt):
    from conftest import run_cli

    ids = "--prompt_ids=" + ",".join(map(str, prompt[:30]))
    common = [ids, "--temp=0", "--n_predict=10", f"--ctx={CTX}", f"--chunk={CHUNK}"]
    # (--mtp_draft=0 runs the same program as --quality: test_cli's chat test covers it)
    spec = run_cli("ds4jax.main", *common, "--mtp_draft=2", "--mtp_margin=0")
    strict = run_cli("ds4jax.main", *common, "--quality")
    for r in (spec, strict):
        assert r.returncode == 0, r.stderr
    assert spec.stdout == strict.stdout
    assert "mtp: drafts proposed" in spec.stderr and "speculative" in spec.stderr
    assert "strict N=1" in strict.stderr
    # one token: the warning comes before any decode program is compiled
    warm = run_cli("ds4jax.main", ids, "--temp=0.8", "--n_predict=1", f"--ctx={CTX}", f"--chunk={CHUNK}")
    assert warm.returncode == 0 and warm.stderr.count("warning: MTP speculative decoding needs greedy") == 1


def test_mtp_draft_step_matches_float64_reference(tiny_files, engine):
    """The MTP block + head against the float64 reference (consecutive steps, so the
    positioned window and the reference's last-n_swa window hold the same rows)."""
    import jax
    from reference.forward64 import RefModel

    from ds4jax.mtp import draft_step, init_mtp_state

    eng = Engine(tiny_files, ctx=CTX, chunk=CHUNK, act_quant=False, weights=engine.weights)
    cfg = eng.cfg
    rng = np.random.default_rng(2)
    prev = rng.standard_normal((cfg.n_hc, cfg.n_embd)).astype(np.float32)
    toks = rng.integers(0, cfg.n_vocab, 40).tolist()
    jitted = jax.jit(lambda w, s, h, t, p: draft_step(cfg, w, s, h, t, p))  # (the weights an argument, as above)
    step = lambda s, h, t, p: jitted(eng.weights, s, h, t, p)
    ref = RefModel(tiny_files, act_quant=False)
    ls = ref.new_mtp_state()
    st = init_mtp_state(cfg)
    errs = []
    for i, t in enumerate(toks):  # 40 steps: the 32-row window slides
        got, _, st = step(st, jnp.asarray(prev), jnp.int32(t), jnp.int32(100 + i))
        want = ref.mtp_step(ls, prev.astype(np.float64), t, 100 + i)
        errs.append(np.abs(np.asarray(got, np.float64) - want).max())
    print(f"\nmtp step vs float64: max|dlogit| {max(errs):.2e}")
    assert max(errs) < 1e-2


def test_draft_margin_is_top_k_gap():
    """The margin is lax.top_k's top-two gap: random logits, a tie at the top (0), the max last,
    -inf elsewhere (a finite gap to the second), all equal."""
    from jax import lax

    from ds4jax.mtp import draft_margin

    rng = np.random.default_rng(5)
    x = rng.standard_normal(1000).astype(np.float32)
    tie = x.copy()
    tie[[17, 400]] = x.max() + 1.0
    last = x.copy()
    last[-1] = x.max() + 2.5
    sparse = np.full(1000, -np.inf, np.float32)
    sparse[[3, 9]] = (1.5, -2.0)
    for v in (x, tie, last, sparse, np.ones(1000, np.float32), x.astype(np.float16)):
        top2 = lax.top_k(jnp.asarray(v, jnp.float32), 2)[0]
        want = float(top2[0] - top2[1])
        assert float(jax.jit(draft_margin)(jnp.asarray(v))) == want
    assert float(draft_margin(jnp.asarray(tie))) == 0.0
