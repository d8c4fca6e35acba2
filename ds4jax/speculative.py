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

import collections
import dataclasses
import threading
import time
import weakref
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

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
    # seconds between successive steps' reports reaching the host: with a step in flight each is
    # one step's GPU time when the loop is GPU-bound (the first also holds the loop's start)
    step_s: list[float] = dataclasses.field(default_factory=list)

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


def mtp_step(cfg: ModelConfig, ctx: int, weights, state, mtp_state, io):
    """One MTP speculative step, its program chosen on the device: the combined N=2 step when
    the draft's margin is at least ``io["min_margin"]`` and two tokens fit (``io["limit"]``: the
    context or the token budget, whichever ends first), else the plain N=1 step, and nothing
    once the state is full (a step dispatched past the end). Returns (state, mtp_state, io,
    report): the next token, draft and margin in ``io``, and the report = [tokens committed 0|1|2,
    verified 0|1, the draft verified, next token] for the host (``mtp_loop`` stacks them)."""
    pos = state["n_tokens"]
    verify_ok = (io["margin"] >= io["min_margin"]) & (pos + 2 <= io["limit"])
    branch = jnp.where(pos >= ctx, 0, jnp.where(verify_ok, 2, 1))

    # The switch runs on the device as a CUDA-graph conditional node (XLA records its branches as
    # nested graphs: session 41), so the host dispatches a step before it reads the last one's
    # report. The tokens committed are read off the state after it.
    def idle(state, mtp_state):
        return io["token"], io["draft"], io["margin"], state, mtp_state

    def plain(state, mtp_state):
        return plain_draft_step(cfg, weights, state, mtp_state, io["token"])

    def combined(state, mtp_state):
        return combined_step(cfg, weights, state, mtp_state, jnp.stack([io["token"], io["draft"]]))[1:]

    nxt, draft, margin, state, mtp_state = jax.lax.switch(branch, (idle, plain, combined), state, mtp_state)
    n = state["n_tokens"] - pos  # 0 idle, 1 plain, 1 or 2 verified
    report = jnp.stack([n, (branch == 2).astype(jnp.int32), io["draft"], nxt])
    return state, mtp_state, {**io, "token": nxt, "draft": draft, "margin": margin}, report


def mtp_loop(cfg: ModelConfig, ctx: int, steps: int, weights, state, mtp_state, io):
    """``steps`` ``mtp_step``s in one program (a fori_loop; one step without it): one
    dispatch and one pass over the arguments for ``steps`` steps, where a step a call left the GPU
    waiting on the host's call of ~2,000 weight arrays (43 layers on an H200, session 43: 9.22
    against 9.87 ms a step that does not verify). ``io["reports"]`` [steps, 4] receives each
    step's report. A step past the token budget is an N=1 step (``io["limit"]`` keeps it from
    verifying) whose tokens the host drops, as ``Engine.generate`` drops a loop's steps past EOS."""

    def body(i, carry):
        state, mtp_state, io, report = mtp_step(cfg, ctx, weights, *carry)
        return state, mtp_state, {**io, "reports": io["reports"].at[i].set(report)}

    if steps == 1:  # no loop: XLA kept a one-trip fori_loop's while (CPU, jax 0.12), a graph node more
        return body(0, (state, mtp_state, io))
    return jax.lax.fori_loop(0, steps, body, (state, mtp_state, io))


def io_steps(io) -> int:
    """The MTP steps a call of the program for this io runs."""
    return io["reports"].shape[0]


def at_least_f32(x: float) -> np.float32:
    """The smallest float32 >= x: an f32 margin m satisfies m >= it exactly when m >= x."""
    y = np.float32(x)
    return y if float(y) >= x else np.nextafter(y, np.float32(np.inf))


# The compiled mtp_loop of each engine, by steps a call (margin and limits are
# inputs), shared by the decoders made on that engine.
_STEP_PROGRAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def lower_step(engine, state, mtp_state, io):
    """``mtp_loop`` of ``io_steps(io)`` steps for ``engine``'s weights and context, traced and
    lowered (not compiled)."""
    step = partial(mtp_loop, engine.cfg, engine.ctx, io_steps(io))
    # keep_unused: io's reports are only written; pruned as unused inputs, their donated buffers
    # could not take the outputs, which would move every call (as in Engine.lower)
    fn = jax.jit(step, donate_argnums=(1, 2, 3), keep_unused=True)
    return fn.lower(engine.weights, state, mtp_state, io)


def step_io(token, draft, margin, min_margin: float, limit: int, steps: int = 1) -> dict:
    """The io of ``mtp_loop`` (``steps`` a call): the token to decode, its draft and the draft's
    margin (host values or device arrays), the margin a draft needs and the position limit of a
    verify step."""
    if steps < 1:
        raise DS4Error(f"MTP steps a call must be >= 1, got {steps}")
    put = lambda x, dt: x.astype(dt) if isinstance(x, jax.Array) else jax.device_put(np.asarray(x, dt))
    return {
        "token": put(token, np.int32),
        "draft": put(draft, np.int32),
        "margin": put(margin, np.float32),
        "min_margin": jax.device_put(at_least_f32(min_margin)),
        "limit": jax.device_put(np.int32(limit)),
        "reports": jax.device_put(np.zeros((steps, 4), np.int32)),
    }


@jax.jit
def peek_report(io):
    """A copy of a call's reports [steps, 4]: it outlives ``io``, which the next call takes (donated)."""
    return io["reports"] + 0


class MTPSpeculativeDecoder:
    """Greedy generation drafting with the MTP head and verifying with the N=2 program.

    ``margin``: draft only when the MTP's top-two logit gap is at least this (ds4's
    --mtp-margin, default 3.0); otherwise the step runs the plain N=1 program.
    ``steps_per_call``: MTP steps a program call (``mtp_loop``), by default the engine's
    (``--steps_per_call``). The tokens are the same whatever it is."""

    def __init__(self, engine, margin: float = 3.0, steps_per_call: int | None = None):
        if engine.weights.get("mtp") is None:
            raise DS4Error("MTP speculative decoding needs an MTP GGUF (--mtp)")
        self.engine, self.margin = engine, float(margin)
        self.steps_per_call = engine.steps_per_call if steps_per_call is None else int(steps_per_call)
        if self.steps_per_call < 1:
            raise DS4Error(f"--steps_per_call must be >= 1, got {self.steps_per_call}")
        self._first_jit = jax.jit(partial(first_draft, engine.cfg), donate_argnums=(1,))
        self._first_exe = None
        self.compile_s = 0.0  # the step program's and the first draft's compiles, outside the timings
        self._lock = threading.Lock()

    def _compile(self, lower, options: dict | None = None):
        """``lower()`` compiled now (XLA ``options``), its seconds added to ``compile_s``."""
        t0 = time.perf_counter()
        exe = lower().compile(compiler_options=options)
        with self._lock:  # builds may run side by side (``compile``)
            self.compile_s += time.perf_counter() - t0
        return exe

    def _program(self, state, mtp_state, io):
        programs = _STEP_PROGRAMS.setdefault(self.engine, {})
        k = io_steps(io)
        if k not in programs:
            # the engine's compile options and XLA_FLAGS, as its other programs (CONCURRENT graphs)
            programs[k] = self._compile(
                lambda: lower_step(self.engine, state, mtp_state, io), self.engine.compiler_options or None
            )
        return programs[k]

    def _first(self, *args):
        """The first draft's program, compiled for ``args``' shapes on first use."""
        if self._first_exe is None:
            self._first_exe = self._compile(lambda: self._first_jit.lower(*args))
        return self._first_exe

    def compile(self) -> None:
        """The greedy prefill, the first draft and the MTP step compiled side by side for their
        shapes, before ``generate`` times anything: at full size each takes minutes on an H200's
        host (the MTP step ~2.5, the layered prefill ~1.5), which one after another added up
        before the first token, and the prefill's compile was in its reported time. Once they
        are built, only the prefill's (compiled) check is left."""
        eng, c = self.engine, self.engine.cfg
        builds = [lambda: eng.compile(["prefill"])]
        step_built = self.steps_per_call in _STEP_PROGRAMS.get(eng, {})
        mtp_state = jax.eval_shape(lambda: init_mtp_state(c))
        if self._first_exe is None:
            i32 = jax.ShapeDtypeStruct((), jnp.int32)
            hidden = jax.ShapeDtypeStruct((c.n_hc, c.n_embd), jnp.float32)  # Engine.last_hidden
            builds.append(lambda: self._first(eng.weights, mtp_state, hidden, i32, i32))
        if not step_built:
            state = jax.eval_shape(eng.new_state)
            io = step_io(0, 0, 0.0, self.margin, eng.ctx, self.steps_per_call)
            builds.append(lambda: self._program(state, mtp_state, io))
        compile_together(builds)

    def generate(
        self,
        prompt: list[int],
        n_predict: int,
        eos_id: int | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> SpecGeneration:
        eng = self.engine
        eng.check_prompt(prompt)
        self.compile()  # outside the timings
        params = SamplingParams(temperature=0.0).arrays()
        t0 = time.perf_counter()
        tok, _, state = eng.prefill(eng.new_state(), prompt, params, jax.random.key(0))
        tok = int(tok)
        t1 = time.perf_counter()
        tokens, stats, stop, decode_s = self.continue_from(
            state, tok, eng.last_hidden, len(prompt), n_predict, eos_id, on_token
        )
        return SpecGeneration(list(prompt), tokens, stats, t1 - t0, decode_s, stop)

    def continue_from(
        self,
        state,
        tok: int,
        hidden,
        pos: int,
        n_predict: int,
        eos_id: int | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> tuple[list[int], SpecStats, str, float]:
        """The speculative loop after a prefill: ``state`` (donated) holds ``pos`` tokens, the
        prefill chose ``tok`` and left ``hidden`` (``Engine.last_hidden``), the final HC state of
        its last token. Returns (the ids, ``tok`` first; the draft counts; the stop reason; the
        seconds it took, compiles excluded)."""
        eng = self.engine
        w = eng.weights
        t0 = time.perf_counter()
        compiled_before = self.compile_s
        mtp_state = init_mtp_state(eng.cfg)
        first_args = (w, mtp_state, hidden, jnp.int32(tok), jnp.int32(pos))
        draft, margin, mtp_state = self._first(*first_args)(*first_args)
        # a verify step needs two context rows and two tokens of the budget left: the state's
        # n_tokens + 2 <= limit (with e tokens emitted, n_tokens = pos + e - 1)
        k = self.steps_per_call
        io = step_io(tok, draft, margin, self.margin, min(eng.ctx, pos + n_predict - 1), k)
        step = self._program(state, mtp_state, io)
        out = _Output(n_predict, eos_id, on_token)
        stats = SpecStats()
        # One call (k steps) in flight ahead of the reports the host reads: the choice between
        # the N=2 and N=1 programs is made on the device (mtp_step), so the host dispatches call
        # c+1 while the GPU runs call c. Each step emits at least one token, so n_predict - 1
        # steps suffice; at most 2k - 1 steps past the end run and are dropped (their state too).
        sent, calls = 0, collections.deque()

        def dispatch() -> None:
            nonlocal state, mtp_state, io, sent
            if sent < n_predict - 1:
                state, mtp_state, io = step(w, state, mtp_state, io)
                calls.append(peek_report(io))
                sent += k

        def reports():  # each step's report, in order; a call's time split evenly over its steps
            last = time.perf_counter()
            dispatch()
            while calls:
                dispatch()  # the next call, before this one is read
                rows = np.asarray(calls.popleft()).tolist()
                now = time.perf_counter()
                for row in rows:
                    stats.step_s.append((now - last) / len(rows))  # as each is read: steps read, timed
                    yield row
                last = now

        produced = reports()
        while not out.emit(tok):
            if pos >= eng.ctx:
                out.stop = "ctx"
                break
            n, verified, drafted, nxt = next(produced)
            if n == 0:  # not reached: the host stops at the context's end first
                out.stop = "ctx"
                break
            pos += n
            if verified:
                if stats.record_verify(n) and out.emit(drafted):
                    break
            else:
                stats.plain_steps += 1
            tok = nxt
        seconds = time.perf_counter() - t0 - (self.compile_s - compiled_before)
        return out.tokens, stats, out.stop, seconds
