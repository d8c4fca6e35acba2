"""Speculative decoding with the combined-forward verifier (greedy only).

One compiled N=2 program runs ``[token, draft]`` through the model in a single forward,
reads both rows' logits, accepts the draft when it equals row 0's argmax (lowest index on
ties) and commits the state after 1 or 2 tokens in the same program: on a miss only the
prefix-1 state survives (raw window, compressor and indexer frontiers and counters as
after row 0; rows the draft wrote past the committed position stay invisible). Because
every row is computed bit-identically whatever the batch (``model.numerics``), the
accepted tokens and the state are exactly those of plain greedy decoding.

Drafts come from a ``drafter`` callable, so the verifier is tested with oracle and wrong
drafts as well as with the MTP head.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp

from ds4jax.config import ModelConfig
from ds4jax.engine import compile_together
from ds4jax.errors import DS4Error
from ds4jax.model.forward import commit, forward_hidden, head
from ds4jax.mtp import draft_margin, draft_step, init_mtp_state
from ds4jax.sampling import SamplingParams


def verify(cfg: ModelConfig, weights, state, tokens):
    """tokens = [token, draft]: (n committed 1|2, next token, logits [2, V], H [2, n_hc, E], state)."""
    H, pending = forward_hidden(cfg, weights, state, tokens)
    logits = head(cfg, weights, H)
    top = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # first index of the max
    accept = top[0] == tokens[1]
    n = 1 + accept.astype(jnp.int32)
    state = commit(cfg, state, pending, n)
    return n, jnp.where(accept, top[1], top[0]), logits, H, state


@dataclasses.dataclass
class SpecStats:
    proposed: int = 0
    accepted: int = 0
    verify_steps: int = 0
    plain_steps: int = 0

    def record_verify(self, n: int) -> bool:
        """Count one N=2 verify step that committed ``n`` tokens; True if the draft was accepted."""
        self.verify_steps += 1
        self.proposed += 1
        self.accepted += n == 2
        return n == 2

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


@dataclasses.dataclass
class SpecGeneration:
    prompt: list[int]
    tokens: list[int]
    stats: SpecStats
    prefill_s: float
    decode_s: float
    stop: str

    @property
    def decode_tps(self) -> float:
        n = max(len(self.tokens) - 1, 0)
        return n / self.decode_s if self.decode_s > 0 else float("inf")

    @property
    def tokens_per_step(self) -> float:
        steps = self.stats.verify_steps + self.stats.plain_steps
        return (len(self.tokens) - 1) / steps if steps else 0.0


class _Output:
    """The generated ids of a speculative run and when to stop emitting them."""

    def __init__(self, n_predict: int, eos_id: int | None, on_token: Callable[[int], None] | None):
        self.tokens: list[int] = []
        self.n_predict, self.eos_id, self.on_token = n_predict, eos_id, on_token
        self.stop = "n_predict"

    def emit(self, t: int) -> bool:
        """Append t; True when generation must end here (EOS or n_predict reached)."""
        self.tokens.append(t)
        if self.on_token is not None:
            self.on_token(t)
        if self.eos_id is not None and t == self.eos_id:
            self.stop = "eos"
            return True
        return len(self.tokens) >= self.n_predict

    def room_for_two(self, pos: int, ctx: int) -> bool:
        """Whether a verify step (two tokens) fits the context and the token budget."""
        return pos + 2 <= ctx and len(self.tokens) + 1 < self.n_predict


Drafter = Callable[[list[int]], "int | None"]  # committed ids so far -> draft for the next one


class SpeculativeDecoder:
    """Greedy generation with the N=2 verifier beside the N=1 decode program of ``engine``."""

    def __init__(self, engine):
        self.engine = engine
        self._verify = jax.jit(partial(verify, engine.cfg), donate_argnums=(1,))

    def generate(
        self,
        prompt: list[int],
        n_predict: int,
        drafter: Drafter,
        eos_id: int | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> SpecGeneration:
        eng = self.engine
        eng.check_prompt(prompt)
        params = SamplingParams(temperature=0.0).arrays()
        key = jax.random.key(0)
        state = eng.new_state()
        t0 = time.perf_counter()
        tok, _, state = eng.prefill(state, prompt, params, key)
        tok = int(tok)
        t1 = time.perf_counter()
        out = _Output(n_predict, eos_id, on_token)
        stats = SpecStats()
        pos = len(prompt)
        while not out.emit(tok):
            if pos >= eng.ctx:
                out.stop = "ctx"
                break
            draft = drafter(list(prompt) + out.tokens) if out.room_for_two(pos, eng.ctx) else None
            if draft is None:
                nxt, _, state = eng.decode(state, tok, params, key)
                stats.plain_steps += 1
                pos += 1
                tok = int(nxt)
                continue
            n, nxt, _, _, state = self._verify(eng.weights, state, jnp.asarray([tok, draft], jnp.int32))
            pos += int(n)
            if stats.record_verify(int(n)) and out.emit(draft):
                break
            tok = int(nxt)
        t2 = time.perf_counter()
        return SpecGeneration(list(prompt), out.tokens, stats, t1 - t0, t2 - t1, out.stop)


def oracle_drafter(reference: list[int], wrong_every: int = 0) -> Drafter:
    """Drafts from a known continuation (tests): the true next token, or a wrong one every
    ``wrong_every`` calls."""
    calls = {"n": 0}

    def draft(ids: list[int]) -> int | None:
        calls["n"] += 1
        i = len(ids)
        if i >= len(reference):
            return None
        true = reference[i]
        if wrong_every and calls["n"] % wrong_every == 0:
            return (true + 1) % 1000
        return true

    return draft


# ---- with the MTP drafter: every step is one compiled program ---------------------------
def first_draft(cfg: ModelConfig, weights, mtp_state, prev_hc, token, pos):
    """The MTP's draft for the token after ``token`` (at ``pos``), from the hidden ``prev_hc``
    of the token before it (seed pairing): (draft, top-two margin, mtp_state)."""
    d_logits, _, mtp_state = draft_step(cfg, weights, mtp_state, prev_hc, token, pos)
    return jnp.argmax(d_logits).astype(jnp.int32), draft_margin(d_logits), mtp_state


def combined_step(cfg: ModelConfig, weights, state, mtp_state, tokens):
    """Verify [token, draft], commit, and draft the next token from the last committed
    hidden and the chosen next token. Returns (n, next, next_draft, margin, state, mtp_state)."""
    n, nxt, _, H, state = verify(cfg, weights, state, tokens)
    prev = jax.lax.dynamic_index_in_dim(H, n - 1, axis=0, keepdims=False)
    draft, margin, mtp_state = first_draft(cfg, weights, mtp_state, prev, nxt, state["n_tokens"])
    return n, nxt, draft, margin, state, mtp_state


def plain_draft_step(cfg: ModelConfig, weights, state, mtp_state, token):
    """One plain greedy token (the N=1 program) plus the draft for the token after it."""
    H, pending = forward_hidden(cfg, weights, state, token[None])
    state = commit(cfg, state, pending, jnp.int32(1))
    nxt = jnp.argmax(head(cfg, weights, H[0])).astype(jnp.int32)
    draft, margin, mtp_state = first_draft(cfg, weights, mtp_state, H[0], nxt, state["n_tokens"])
    return nxt, draft, margin, state, mtp_state


class MTPSpeculativeDecoder:
    """Greedy generation drafting with the MTP head and verifying with the N=2 program.

    ``margin``: draft only when the MTP's top-two logit gap is at least this (ds4's
    --mtp-margin, default 3.0); otherwise the step runs the plain N=1 program."""

    def __init__(self, engine, margin: float = 3.0):
        if engine.weights.get("mtp") is None:
            raise DS4Error("MTP speculative decoding needs an MTP GGUF (--mtp)")
        cfg = engine.cfg
        self.engine, self.margin = engine, float(margin)
        self._combined = jax.jit(partial(combined_step, cfg), donate_argnums=(1, 2))
        self._plain = jax.jit(partial(plain_draft_step, cfg), donate_argnums=(1, 2))
        self._first = jax.jit(partial(first_draft, cfg), donate_argnums=(1,))

    def generate(
        self,
        prompt: list[int],
        n_predict: int,
        eos_id: int | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> SpecGeneration:
        eng = self.engine
        w = eng.weights
        eng.check_prompt(prompt)
        params = SamplingParams(temperature=0.0).arrays()
        state = eng.new_state()
        t0 = time.perf_counter()
        tok, _, state = eng.prefill(state, prompt, params, jax.random.key(0))
        pos = len(prompt)
        draft, margin, mtp_state = self._first(w, init_mtp_state(eng.cfg), eng.last_hidden, tok, jnp.int32(pos))
        tok, draft, margin = int(tok), int(draft), float(margin)
        t1 = time.perf_counter()
        if not hasattr(self, "_programs"):  # compile both step programs outside the timings
            pair, one = jnp.zeros(2, jnp.int32), jnp.zeros((), jnp.int32)
            self._programs = tuple(
                compile_together(
                    [
                        lambda: self._combined.lower(w, state, mtp_state, pair).compile(),
                        lambda: self._plain.lower(w, state, mtp_state, one).compile(),
                    ]
                )
            )
            self.compile_s = time.perf_counter() - t1
            t1 = time.perf_counter()
        combined, plain = self._programs
        out = _Output(n_predict, eos_id, on_token)
        stats = SpecStats()
        while not out.emit(tok):
            if pos >= eng.ctx:
                out.stop = "ctx"
                break
            if margin >= self.margin and out.room_for_two(pos, eng.ctx):
                n, nxt, d, m, state, mtp_state = combined(w, state, mtp_state, jnp.asarray([tok, draft], jnp.int32))
                pos += int(n)
                if stats.record_verify(int(n)) and out.emit(draft):
                    break
            else:
                nxt, d, m, state, mtp_state = plain(w, state, mtp_state, jnp.asarray(tok, jnp.int32))
                stats.plain_steps += 1
                pos += 1
            tok, draft, margin = int(nxt), int(d), float(m)
        t2 = time.perf_counter()
        return SpecGeneration(list(prompt), out.tokens, stats, t1 - t0, t2 - t1, out.stop)
