"""The jit-compiled forward pass on the tiny model: against the float64 reference, and
whole-prompt prefill, chunked prefill and token-by-token decode against each other."""

import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CHUNK, CTX, run_cli

from ds4jax.engine import Engine
from ds4jax.model.compressor import frontier_view
from ds4jax.sampling import SamplingParams

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference.forward64 import RefModel

N_PROMPT = 150  # crosses the 32-token window, emits 37 ratio-4 rows (> top-k 16) and 1 ratio-128 row
N_FED = 40  # decode_fed's tokens in the whole/chunked/decode test: past the window, 10 ratio-4 rows
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def ids(tiny_files):
    return np.random.default_rng(11).integers(0, tiny_files.config.n_vocab, N_PROMPT).astype(np.int32)


def prefill_all(engine, ids):
    state = engine.new_state()
    _, logits, state = engine.prefill(state, ids, GREEDY.arrays(), jax.random.key(0), all_logits=True)
    return logits, state


@pytest.fixture(scope="module")
def chunked(engine, ids):
    return prefill_all(engine, ids)


def test_compiles_a_handful_of_programs_and_greedy_is_deterministic(tiny_files, engine):
    # The shared engine while nothing is compiled on it (this test comes first in the file, so the
    # generate tests below run on its programs), else a new one of its shapes: either way a fresh
    # engine's count.
    eng = engine if not engine.compile_s else Engine(tiny_files, ctx=CTX, chunk=CHUNK, weights=engine.weights)
    jax.block_until_ready((eng.new_state(), eng.new_io()))  # the state's small init ops, whatever ran before
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else None
    )
    # 3 prefill chunks (the last one partial) and 6 decode_loop4 calls (the last one partly read):
    # every program generate uses, at a fraction of the CPU time of longer runs.
    prompt = np.random.default_rng(3).integers(0, tiny_files.config.n_vocab, 2 * CHUNK + 7).tolist()
    g1 = eng.generate(prompt, 22, GREEDY)
    n = len(compiles)
    print(f"\n{n} compilations for a {len(prompt)}-token prompt + 22 tokens")
    # prefill, decode_loop4, the tokens' copy (peek), the token and prompt staging, the key's seed
    assert n <= 6 and len(g1.tokens) == 22
    g2 = eng.generate(prompt, 22, GREEDY)
    assert g1.tokens == g2.tokens
    assert len(compiles) == n  # nothing new compiled the second time


def reference_logits(mf, ids, act_quant):
    ref = RefModel(mf, act_quant=act_quant)
    st = ref.new_state()
    rows = np.stack([ref.step(st, int(t)) for t in ids])
    return rows, st


def test_matches_float64_reference_without_activation_quantization(tiny_files, engine, ids):
    # Tolerance: f32 vs f64 arithmetic differs by ~1e-6 relative; the FP8 KV simulation
    # (3 mantissa bits) and f16 cache rounding turn the rare element sitting on a rounding
    # boundary into a jump of one code, which moves logits by ~1e-3 (measured max 2.9e-3
    # over 150 positions; logit std is ~2.5). 1e-2 passes that and fails any real error
    # (a wrong rope sign, row, mask or weight moves logits by O(1)).
    f32 = Engine(tiny_files, ctx=CTX, chunk=CHUNK, act_quant=False, weights=engine.weights)
    got, _ = prefill_all(f32, ids)
    want, st = reference_logits(tiny_files, ids, act_quant=False)
    err = np.abs(got - want).max(axis=1)
    print(f"\nno act-quant: max|dlogit| median {np.median(err):.2e}, max {err.max():.2e}")
    assert err.max() < 1e-2 and np.median(err) < 1e-4
    # The prompt exercised what it should: compression of both ratios and a strict top-k.
    cfg = tiny_files.config
    assert st.layers[2].n_comp == N_PROMPT // 4 > cfg.idx_top_k
    assert st.index_log[-1][2] == (N_PROMPT // 4, cfg.idx_top_k)
    assert st.layers[3].n_comp == N_PROMPT // 128 == 1


def test_matches_float64_reference_with_activation_quantization(tiny_files, chunked, ids):
    # With int8 activation blocks the codes are decided by one f32 product per element.
    # Activations made of few-bit values (FP8/f16 rows times a softmax weight) often sit
    # exactly on a .5 tie, so the float64 reference, whose inputs differ from ours in the
    # last bit, picks the other code: each flip moves an output by d_x * w (~1e-2), and a
    # few per layer compound to ~0.1 on the logits (measured: median 0.11, max 0.72 over
    # 150 positions, the max where a flip also changed a top-k choice). Bounds: median 0.3,
    # max 1.5; the 1e-2 test above pins the float math itself.
    got = chunked[0]
    want, _ = reference_logits(tiny_files, ids, act_quant=True)
    err = np.abs(got - want).max(axis=1)
    print(f"\nact-quant: max|dlogit| median {np.median(err):.3f}, max {err.max():.3f}")
    assert np.median(err) < 0.3 and err.max() < 1.5
    assert np.mean(got.argmax(1) == want.argmax(1)) > 0.9


def _visible_state(cfg, state):
    """The state's meaningful parts: raw window, compressed rows 0..n//r-1, frontiers."""
    n = int(state["n_tokens"])
    out = {"n": n}
    for L, st in enumerate(state["layers"]):
        out[f"{L}.raw"] = np.asarray(st["raw"])
        r = cfg.ratio(L)
        if r:
            out[f"{L}.comp"] = np.asarray(st["comp"])[: n // r]
            out[f"{L}.cmp"] = (np.asarray(st["cmp_kv"]), np.asarray(st["cmp_score"]))
            if "idx" in st:
                out[f"{L}.idx"] = np.asarray(st["idx"])[: n // r]
                out[f"{L}.icmp"] = (np.asarray(st["icmp_kv"]), np.asarray(st["icmp_score"]))
    return out


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        x, y = (a[k], b[k]) if isinstance(a[k], tuple) else ((a[k],), (b[k],))
        for u, v in zip(x, y):
            assert np.array_equal(u, v), k


def test_whole_chunked_and_token_by_token_agree_bit_for_bit(tiny_files, engine, chunked, ids):
    cfg = engine.cfg
    whole = Engine(tiny_files, ctx=CTX, chunk=N_PROMPT + 10, weights=engine.weights)
    lw, sw = prefill_all(whole, ids)
    lc, sc = chunked
    # token by token through the decode program
    state = engine.new_state()
    rows = []
    for i, t in enumerate(ids):
        _, logits, state = engine.decode(state, int(t), GREEDY.arrays(), jax.random.key(0))
        rows.append(np.asarray(logits))
        if i + 1 == N_FED:  # a copy: the next call takes (donates) the state
            at_fed = jax.tree.map(jnp.copy, state)
    ld = np.stack(rows)
    # the device-fed decode (token and outputs in a donated buffer): the same rows and state over
    # the first N_FED tokens (past the window and a few compressed rows; the model code is decode's)
    fed, io, frows = engine.new_state(), engine.new_io(), []
    for t in ids[:N_FED]:
        fed, io = engine.decode_fed(fed, {**io, "token": jnp.int32(t)}, GREEDY.arrays(), jax.random.key(0))
        frows.append(np.asarray(io["logits"]))
    assert np.array_equal(np.stack(frows), ld[:N_FED])
    _assert_same_state(_visible_state(cfg, fed), _visible_state(cfg, at_fed))
    assert np.array_equal(lw, lc), np.flatnonzero(np.abs(lw - lc).max(1))[:5]
    assert np.array_equal(lc, ld), np.flatnonzero(np.abs(lc - ld).max(1))[:5]
    vc = _visible_state(cfg, sc)
    _assert_same_state(_visible_state(cfg, sw), vc)
    _assert_same_state(vc, _visible_state(cfg, state))
    # The frontier (a ring; its MODEL.md §5.2 view) holds exactly the partial windows: 150 = 4*37 + 2.
    kv, score = frontier_view(*vc["2.cmp"], N_PROMPT, 4, 2)
    assert np.all(score[6:] == -1e30) and np.all(kv[6:] == 0) and np.all(score[:6] > -1e29)
    kv, score = frontier_view(*vc["3.cmp"], N_PROMPT, 128, 1)
    assert np.all(score[N_PROMPT % 128 :] == -1e30) and np.all(score[: N_PROMPT % 128] > -1e29)
    # ... while the ring holds the latest 8 positions' rows: window 36 in half 0, then 148, 149 and
    # the stale 142, 143 in half 1
    assert np.all(vc["2.cmp"][1] > -1e29)
    # ... and feeding itself, the greedy continuation of the token-by-token decode
    nxt = int(np.argmax(ld[N_FED - 1]))
    assert int(io["token"]) == nxt
    for _ in range(3):
        nxt, _, at_fed = engine.decode(at_fed, nxt, GREEDY.arrays(), jax.random.key(0))
        nxt = int(nxt)
        fed, io = engine.decode_fed(fed, io, GREEDY.arrays(), jax.random.key(0))
        assert int(io["token"]) == nxt


def test_generate_runs_a_step_ahead_with_a_step_by_step_loops_results(engine):
    """``generate`` keeps one call (decode_loop4; decode_fed with logits rows) in flight ahead of
    the tokens it reads; its tokens, stop reason and logits rows are those of a loop that reads
    each token before the next step (after an EOS, the step already in flight gives the last
    row; at the context's end, a call's steps past it are not read)."""
    params, key = GREEDY.arrays(), jax.random.key(0)

    def stepwise(prompt, n, eos=None):
        state = engine.new_state()
        tok, _, state = engine.prefill(state, prompt, params, key)
        out, rows = [int(tok)], []
        while len(prompt) + len(out) - 1 < CTX:  # the step that takes out[-1] fits
            tok, logits, state = engine.decode(state, out[-1], params, key)
            rows.append(np.asarray(logits))
            if len(out) == n or out[-1] == eos:
                break
            out.append(int(tok))
        return out, rows

    prompt = [0, 100, 200, 300]
    want, rows = stepwise(prompt, 12)
    g = engine.generate(prompt, 12, GREEDY)
    assert (g.tokens, g.stop) == (want, "n_predict")
    eos = want[5]
    cut = want[: want.index(eos) + 1]
    assert engine.generate(prompt, 12, GREEDY, eos_id=eos).tokens == cut  # read from 4-step calls
    g = engine.generate(prompt, 12, GREEDY, eos_id=eos, keep_logits=True)
    assert (g.tokens, g.stop) == (cut, "eos")
    assert len(g.logits) == len(prompt) + len(cut)
    assert np.array_equal(np.stack(g.logits[len(prompt) :]), np.stack(rows[: len(cut)]))
    long = np.random.default_rng(4).integers(0, engine.cfg.n_vocab, CTX - 3).tolist()
    g = engine.generate(long, 10, GREEDY)  # 3 context rows left: 4 tokens (the prefill's and 3 steps')
    assert (len(g.tokens), g.stop) == (4, "ctx")


@pytest.mark.parametrize("name", ["decode_fed", "decode_loop2"])
def test_device_fed_programs_write_every_output_in_place(engine, name):
    """Every output of the device-fed programs takes a donated input's buffer, so no buffer
    moves between calls (a moved one makes XLA update the CUDA-graph nodes that use it)."""
    _assert_outputs_aliased(engine.lower(name))


def _assert_outputs_aliased(low):
    """Every output of the lowered program ``low`` takes a donated input's buffer."""
    aliased = {int(i) for i in re.findall(r"tf.aliasing_output = (\d+)", low.as_text())}
    assert aliased == set(range(len(jax.tree.leaves(low.out_info))))


def test_decode_loop_runs_several_steps_in_one_program_with_the_same_bits(engine):
    """``decode_loop`` (steps decode_fed steps in a fori_loop, one call) gives each step's token,
    the last step's logits and HC state, and the state, bit for bit as the steps one by one."""
    params, key = GREEDY.arrays(), jax.random.key(0)
    state = engine.new_state()
    tok, _, state = engine.prefill(state, [5, 50, 500, 5000], params, key)
    looped = jax.tree.map(jnp.copy, state)
    io, tokens = engine.new_io(int(tok)), []
    for _ in range(4):  # generate's program (decode_loop4): compiled once for both tests
        state, io = engine.decode_fed(state, io, params, key)
        tokens.append(int(io["token"]))
    looped, lio = engine.decode_loop(looped, engine.new_io(int(tok), 4), params, key, 4)
    assert np.asarray(lio["tokens"]).tolist() == tokens
    for k in ("token", "logits", "hidden"):
        assert np.array_equal(np.asarray(lio[k]), np.asarray(io[k])), k
    for a, b in zip(jax.tree.leaves(looped), jax.tree.leaves(state)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_sampling_settings(tiny_files, engine):
    # (each sampler kind is its own pair of programs; the sorted top-k/top-p filters are
    # checked inside jit in test_sampling.py, so this compiles only greedy and plain draws)
    prompt = [0, 100, 200, 300]
    greedy = engine.generate(prompt, 6, GREEDY).tokens
    assert engine.generate(prompt, 6, SamplingParams(temperature=0.7, min_p=1.0, seed=5)).tokens == greedy
    a = engine.generate(prompt, 12, SamplingParams(temperature=2.0, min_p=0.0, seed=1)).tokens
    b = engine.generate(prompt, 12, SamplingParams(temperature=2.0, min_p=0.0, seed=1)).tokens
    c = engine.generate(prompt, 12, SamplingParams(temperature=2.0, min_p=0.0, seed=2)).tokens
    assert a == b and a != c
    from ds4jax.errors import DS4Error

    for bad in ({"temperature": -1.0}, {"top_p": 0.0}, {"min_p": 1.5}, {"top_k": -2}):
        with pytest.raises(DS4Error):
            SamplingParams(**bad).validate()
    with pytest.raises(DS4Error, match="does not fit the context of 512"):
        engine.generate(list(range(600)), 1, GREEDY)


def test_cli_text_prompt_generates_and_dumps_logits(tmp_path, tiny_files, engine):
    # One run for the text path (the chat template) and the logits dump, which decodes plainly (the
    # speculative CLI has its own test)
    from ds4jax.chat import DEFAULT_SYSTEM, render_prompt
    from ds4jax.tokenizer import Tokenizer

    out = tmp_path / "dump.npz"
    text = "Ciao, come stai?"
    r = run_cli(
        "ds4jax.main",
        f"--prompt={text}",
        "--temp=0",
        "--n_predict=4",
        f"--ctx={CTX}",
        f"--chunk={CHUNK}",
        f"--dump_logits={out}",
    )
    assert r.returncode == 0, r.stderr
    assert "generated 4 tokens" in r.stderr and "tokens/s" in r.stderr
    ids = render_prompt(Tokenizer.from_gguf_metadata(tiny_files.base.metadata), text, system=DEFAULT_SYSTEM, ctx=CTX)
    n = len(ids)
    d = np.load(out)
    assert d["tokens"].dtype == np.int32 and d["logits"].dtype == np.float32
    assert d["tokens"].shape == (n + 4,) and d["logits"].shape == (n + 4, engine.cfg.n_vocab)
    assert np.array_equal(d["tokens"][:n], ids)
    # Greedy: each generated token is the argmax of the previous row.
    assert np.array_equal(d["tokens"][n:], d["logits"][n - 1 : n + 3].argmax(1))
    want, _ = prefill_all(engine, ids)
    assert np.array_equal(d["logits"][:n], want)
