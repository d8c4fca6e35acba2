"""The session loop: chunked prefill and token-by-token decode over compiled programs.

Two programs per engine (plus an all-rows-logits prefill variant for diagnostics, and
``decode_loop<K>``: K decode_fed steps in one program):
* prefill: a fixed chunk of ``chunk`` tokens (the last chunk padded, ``n_valid`` traced),
  returning the last valid row's logits and the next token;
* decode: one token in, the next token (sampled inside the program) and its logits out;
  ``decode_fed`` is the same step with the token kept on the device (read from and written back
  into a donated buffer), for loops that need not see each token before the next step, and
  ``decode_loop<K>`` runs K of those steps in one call: ``generate`` runs on it (``decode_fed``
  for K = 1) with one call in flight ahead of the tokens it reads.
The KV-cache state is donated to each call, so nothing large is copied per token.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ds4jax.config import ModelConfig
from ds4jax.device_memory import memory_headroom
from ds4jax.errors import DS4Error
from ds4jax.layered_prefill import PREFIX as LAYERED
from ds4jax.layered_prefill import SAMPLER_FREE, LayeredPrefill, chunk_head
from ds4jax.model.forward import commit, forward_hidden
from ds4jax.model.rope import rope_tables
from ds4jax.model_file import ModelFiles
from ds4jax.quant.layouts import with_expert_layout
from ds4jax.quant.planes import tree_nbytes
from ds4jax.sampling import SamplingParams, kind_of
from ds4jax.state import init_state
from ds4jax.weights import file_nbytes, load_weights

DEFAULT_CHUNK = 64
# Decode steps a program call in ``generate``: one call's host work (dispatch, ~2,200 arguments,
# the CUDA graphs' launch) is paid once for K tokens. H200, session 15: 4-6 % faster than K = 1 at
# 8 layers (K = 8 no better); at 43 layers, GPU-bound, the two within the processes' spread (-11 %,
# +8 %), with 4.3 against 9.4 ms of host time a token.
DEFAULT_STEPS_PER_CALL = 4


def _prefill(cfg: ModelConfig, logits_rows: str, sampler: str, weights, state, tokens, n_valid, params, key):
    H, pending = forward_hidden(cfg, weights, state, tokens)
    state = commit(cfg, state, pending, n_valid)
    # h_last: the final HC state of the last token, which the MTP drafter pairs with the next.
    tok, logits, h_last = chunk_head(cfg, logits_rows, sampler, weights, H, n_valid, state["n_tokens"], params, key)
    return tok, logits, state, h_last


def _decode(cfg: ModelConfig, sampler: str, weights, state, token, params, key):
    tok, logits, state, h = _prefill(cfg, "last", sampler, weights, state, token[None], jnp.int32(1), params, key)
    return tok, logits, state, h


def _decode_fed(cfg: ModelConfig, sampler: str, weights, state, io, params, key):
    """decode with its token read from ``io`` and its outputs written back into it (``io`` is
    donated with the state): every buffer the program touches then keeps its address from step
    to step, where a token passed in and outputs allocated per call move (XLA updates a CUDA
    graph's nodes whose buffers moved). 43 layers on an H200 (session 13, one process,
    interleaved): 15.65 ms a token fed this way against 16.61 ms."""
    tok, logits, state, h = _decode(cfg, sampler, weights, state, io["token"], params, key)
    like = lambda v, ref: v.astype(ref.dtype)  # the same dtypes, so XLA can alias them
    return state, {
        "token": like(tok, io["token"]),
        "logits": like(logits, io["logits"]),
        "hidden": like(h, io["hidden"]),
    }


def _decode_loop(cfg: ModelConfig, sampler: str, steps: int, weights, state, io, params, key):
    """``steps`` decode_fed steps in one program (a fori_loop): one dispatch and one pass over
    the arguments for ``steps`` tokens; ``io["tokens"]`` [steps] receives each step's token."""

    def body(i, carry):
        state, io = carry
        state, out = _decode_fed(cfg, sampler, weights, state, {k: io[k] for k in _IO_STEP}, params, key)
        return state, {**out, "tokens": io["tokens"].at[i].set(out["token"])}

    return jax.lax.fori_loop(0, steps, body, (state, io))


_IO_STEP = ("token", "logits", "hidden")  # what one decode_fed step reads and writes
_LOOP = "decode_loop"  # program names decode_loop<steps>


def _loop_steps(name: str) -> int:
    """The steps of a ``decode_loop<steps>`` program name; 0 for any other name."""
    tail = name[len(_LOOP) :] if name.startswith(_LOOP) else ""
    return int(tail) if tail.isdigit() else 0


@partial(jax.jit, static_argnums=1)
def peek(io: dict, logits: bool):
    """Copies of a call's tokens [K] (``decode_loop``'s ``tokens``, or ``decode_fed``'s one token)
    and of the last step's logits: they outlive ``io``, which the next call takes (donated), so
    the host can read them while that call runs."""
    tokens = io["tokens"] if "tokens" in io else io["token"][None]
    return tokens + 0, (io["logits"] + 0 if logits else None)


# Kept free when repacking experts to a larger layout: one tensor's new copy while it converts
# (1.2 GB for a full-size gate or up tensor as nibbles), the programs' temporaries (0.01-0.34 GB
# measured at full size) and margin; the KV state is added by size.
_LAYOUT_RESERVE = 4 << 30


def state_nbytes(cfg: ModelConfig, ctx: int, chunk: int) -> int:
    """Bytes of an engine's KV state for this context and prefill chunk (shapes only, nothing made)."""
    return tree_nbytes(jax.eval_shape(lambda: init_state(cfg, ctx, chunk)))


def layout_keep_free(cfg: ModelConfig, ctx: int, chunk: int) -> int:
    """Bytes a repack of the experts leaves free for an engine of this context: its KV state and
    ``_LAYOUT_RESERVE`` (``load_weights``' and ``random_weights``' ``keep_free``)."""
    return state_nbytes(cfg, ctx, chunk) + _LAYOUT_RESERVE


def repack_experts(weights: dict, layout: str, cfg: ModelConfig, ctx: int, chunk: int) -> dict:
    """``with_expert_layout`` of loaded weights (copied: the caller keeps them) within the device
    memory an engine of this context leaves (no limit where the device does not say, the CPU). A
    model that fills the device is repacked as it loads instead (``load_weights(expert_layout=)``)."""
    if layout == "gguf":
        return with_expert_layout(weights, layout)  # unchanged (and the layout name checked)
    budget = memory_headroom(layout_keep_free(cfg, ctx, chunk))
    return with_expert_layout(weights, layout, budget=budget)


def check_fits(mf: ModelFiles, cfg: ModelConfig, ctx: int, chunk: int, headroom: int | None = None) -> None:
    """A clear error before loading when the model's weights and a ``ctx``-token state cannot fit
    the device's free memory (``headroom``: the allocator's, by default; None, as on the CPU, skips
    the check): the alternative is XLA's RESOURCE_EXHAUSTED in the middle of the upload. The
    planes hold the files' bytes (a few tables aside)."""
    headroom = memory_headroom() if headroom is None else headroom
    if headroom is None or ctx < 1 or chunk < 1:  # a bad ctx or chunk: the engine says so itself
        return
    weights = file_nbytes(mf)
    state = state_nbytes(cfg, ctx, min(chunk, ctx))
    if weights + state > headroom:
        raise DS4Error(
            f"the model's weights ({weights / 1e9:.1f} GB) and a {ctx}-token state ({state / 1e9:.2f} GB) do not fit "
            f"the {headroom / 1e9:.1f} GB the device has free (XLA_PYTHON_CLIENT_MEM_FRACTION caps JAX's share)"
        )


def load_for_engine(mf: ModelFiles, cfg: ModelConfig, ctx: int, chunk: int, expert_layout: str) -> dict:
    """The weights of an engine of this context on the device: ``check_fits`` first, then loaded a
    tensor at a time with the routed experts in ``expert_layout`` within the memory the engine's
    state and ``_LAYOUT_RESERVE`` leave (``load_weights``)."""
    check_fits(mf, cfg, ctx, chunk)
    keep = layout_keep_free(cfg, ctx, min(chunk, ctx))
    return load_weights(mf, expert_layout=expert_layout, keep_free=keep)


def compile_together(builds: list[Callable[[], Any]]) -> list:
    """The results of ``builds`` (each lowers and compiles a program), run in threads: XLA
    compiles in C++ without the GIL, and a full-size program takes minutes (the MTP step ~2.5 on
    an H200's host), so a many-core host builds several in the time of one."""
    if len(builds) <= 1:
        return [b() for b in builds]
    with ThreadPoolExecutor(len(builds)) as pool:
        return list(pool.map(lambda b: b(), builds))


def _key(name: str, sampler: str) -> str:
    free = sampler == "greedy" or name.startswith(SAMPLER_FREE)  # the layered prefill's blocks: any sampler
    return name if free else f"{name}:{sampler}"


def check_prompt(ids: list[int], ctx: int, n_vocab: int) -> None:
    """A prompt must be non-empty, fit the context and use ids of the vocabulary."""
    if not ids:
        raise DS4Error("empty prompt")
    if len(ids) > ctx:
        raise DS4Error(f"prompt of {len(ids)} tokens does not fit the context of {ctx} tokens (--ctx)")
    bad = [t for t in ids if not 0 <= t < n_vocab]
    if bad:
        raise DS4Error(f"token id {bad[0]} is outside the vocabulary (0..{n_vocab - 1})")


@dataclasses.dataclass
class Generation:
    prompt: list[int]
    tokens: list[int]  # generated ids (EOS included if it stopped there)
    logits: list[np.ndarray] | None  # row i: logits after token i of prompt + tokens (if asked)
    prefill_s: float
    decode_s: float
    stop: str  # "eos", "n_predict" or "ctx"

    @property
    def prefill_tps(self) -> float:
        return len(self.prompt) / self.prefill_s if self.prefill_s > 0 else float("inf")

    @property
    def decode_tps(self) -> float:
        n = max(len(self.tokens) - 1, 0)  # the first token comes from the prefill program
        return n / self.decode_s if self.decode_s > 0 else float("inf")


class Engine:
    """A loaded model with its compiled prefill and decode programs for one context size."""

    def __init__(
        self,
        mf: ModelFiles,
        ctx: int,
        chunk: int = DEFAULT_CHUNK,
        act_quant: bool = True,
        weights=None,
        compiler_options: dict | None = None,
        expert_layout: str = "auto",
        steps_per_call: int = DEFAULT_STEPS_PER_CALL,
        layered_prefill: bool | None = None,
    ):
        """``compiler_options``: XLA options (``xla_*`` names, as ``Lowered.compile`` takes them)
        for this engine's programs, e.g. to A/B an option inside one process. ``expert_layout``:
        the routed experts' gate/up planes as stored (``gguf``) or IQ2_XXS repacked to nibbles
        (``nib``, ``quant/layouts.py``: the same bits, 2.1x their memory; as many tensors as the
        device's free memory allows); ``auto``: nibbles on a GPU, as stored elsewhere. Weights the
        engine loads itself are converted as they load; ``weights`` given to it are copied
        (``repack_experts``), except under ``auto``, which takes them as they are. ``steps_per_call``: decode steps
        a program call in ``generate`` (``decode_loop<K>``; 1: ``decode_fed``)."""
        cfg = dataclasses.replace(mf.config, act_quant=act_quant)
        if ctx < 1:
            raise DS4Error(f"--ctx must be positive, got {ctx}")
        if ctx > cfg.n_ctx_train:
            raise DS4Error(f"--ctx {ctx} exceeds the model's trained context of {cfg.n_ctx_train}")
        if chunk < 1:
            raise DS4Error(f"prefill chunk must be positive, got {chunk}")
        if steps_per_call < 1:
            raise DS4Error(f"--steps_per_call must be >= 1, got {steps_per_call}")
        self.steps_per_call = steps_per_call
        self.layered_prefill = jax.default_backend() == "gpu" if layered_prefill is None else layered_prefill
        self._layered: LayeredPrefill | None = None
        self.cfg, self.ctx, self.chunk = cfg, ctx, min(chunk, ctx)
        self.files = mf
        if weights is None:  # repacked tensor by tensor as it loads
            base = load_for_engine(mf, cfg, ctx, self.chunk, expert_layout)
        elif expert_layout == "auto":  # given weights stay as they are
            base = weights
        else:
            base = repack_experts(weights, expert_layout, cfg, ctx, self.chunk)
        self.weights = {**base, "rope": jax.device_put(rope_tables(cfg, ctx))}
        self._compiled: dict = {}
        self._params: dict = {}  # sampling values -> (sampler kind, their device copies)
        self.compile_s: dict[str, float] = {}
        self.compiler_options = dict(compiler_options or {})

    def _abstract_args(self, name: str):
        sds = lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype)
        state = jax.eval_shape(self.new_state)
        params = SamplingParams().arrays()
        key = jax.eval_shape(lambda: jax.random.key(0))
        if name == "decode":
            tokens = jax.ShapeDtypeStruct((), jnp.int32)
            return (self.weights, state, tokens, params, key)
        if name == "decode_fed" or _loop_steps(name):
            io = jax.eval_shape(partial(self.new_io, 0, _loop_steps(name)))
            return (self.weights, state, io, params, key)
        tokens = jax.ShapeDtypeStruct((self.chunk,), jnp.int32)
        return (self.weights, state, tokens, sds(np.int32(0)), params, key)

    def lower(self, name: str, sampler: str = "greedy"):
        """The program ``name`` (prefill, prefill_all, decode, decode_fed, decode_loop<steps>, or one
        of the layered prefill's ``program_names``) with the static sampler ``sampler``, traced and
        lowered for this engine's shapes, not yet compiled."""
        if name.startswith(LAYERED):
            params = SamplingParams().arrays()
            key = jax.eval_shape(lambda: jax.random.key(0))
            return self._layers().lower(name, sampler, params, key)
        if name == "decode":
            fn = partial(_decode, self.cfg, sampler)
        elif name == "decode_fed":
            fn = partial(_decode_fed, self.cfg, sampler)
        elif _loop_steps(name) > 0:
            fn = partial(_decode_loop, self.cfg, sampler, _loop_steps(name))
        elif name in ("prefill", "prefill_all"):
            fn = partial(_prefill, self.cfg, "last" if name == "prefill" else "all", sampler)
        else:
            raise ValueError(f"no program {name!r}")
        donate = (1,) if name in ("decode", "prefill", "prefill_all") else (1, 2)  # the state (and io)
        # keep_unused: io's logits and hidden are only written; pruned as unused inputs, their donated
        # buffers could not take the outputs, which then got fresh buffers every call.
        return jax.jit(fn, donate_argnums=donate, keep_unused=True).lower(*self._abstract_args(name))

    def program(self, name: str, sampler: str = "greedy"):
        """The compiled program ``name`` for one sampler kind (``sampling.kind_of``), compiled on
        first use; ``compile_s`` is keyed ``name`` for greedy, ``name:sampler`` otherwise."""
        self.compile([name], sampler)
        return self._compiled[_key(name, sampler)]

    def _layers(self) -> LayeredPrefill:
        if self._layered is None:
            self._layered = LayeredPrefill(self.cfg, self.weights, jax.eval_shape(self.new_state), self.chunk)
        return self._layered

    def program_names(self, name: str) -> list[str]:
        """The compiled programs behind ``name``: the layered prefill's for prefill and prefill_all
        (with ``layered_prefill``), else ``name`` itself."""
        if self.layered_prefill and name in ("prefill", "prefill_all"):
            return self._layers().names(all_logits=name == "prefill_all")
        return [name]

    def compile(self, names, sampler: str = "greedy", lowered: dict | None = None) -> None:
        """Compile the programs ``names`` not compiled yet, side by side (``compile_together``).
        ``lowered``: programs already lowered (``lower``), by name, e.g. traced while a bench
        changed a module constant, to be compiled here in parallel with the rest."""
        names = [p for n in names for p in self.program_names(n)]
        todo = [n for n in dict.fromkeys(names) if _key(n, sampler) not in self._compiled]
        lowered = lowered or {}

        def build(name):
            t0 = time.perf_counter()
            low = lowered[name] if name in lowered else self.lower(name, sampler)
            exe = low.compile(compiler_options=self.compiler_options or None)
            return exe, time.perf_counter() - t0

        for name, (exe, secs) in zip(todo, compile_together([partial(build, n) for n in todo])):
            self._compiled[_key(name, sampler)] = exe
            self.compile_s[_key(name, sampler)] = secs

    def new_state(self) -> dict:
        return init_state(self.cfg, self.ctx, self.chunk)

    def check_prompt(self, ids: list[int]) -> None:
        check_prompt(ids, self.ctx, self.cfg.n_vocab)

    def prefill(self, state, ids, params, key, all_logits=False, progress: Callable[[int, int], None] | None = None):
        """Run ``ids`` through the model in chunks. Returns (next token, logits, state):
        logits is the last row [V] (device), or every row [n, V] (host) with ``all_logits``.
        The last token's final HC state is left in ``self.last_hidden``."""
        ids = np.asarray(ids, np.int32)
        kind, params = self._sampling(params)
        name = "prefill_all" if all_logits else "prefill"
        if self.layered_prefill:
            self.compile([name], kind)
            names = self.program_names(name)
            programs = {n: self._compiled[_key(n, kind)] for n in names}
            fn = partial(self._layers().run, programs, names[-1])
        else:
            fn = partial(self.program(name, kind), self.weights)
        rows = []
        tok = logits = None
        for start in range(0, len(ids), self.chunk):
            part = ids[start : start + self.chunk]
            n = len(part)
            tokens = np.zeros(self.chunk, np.int32)
            tokens[:n] = part
            tok, logits, state, self.last_hidden = fn(state, jnp.asarray(tokens), jnp.int32(n), params, key)
            if all_logits:
                rows.append(np.asarray(logits)[:n])
            if progress is not None:
                progress(start + n, len(ids))
        return tok, (np.concatenate(rows) if all_logits else logits), state

    def decode(self, state, token, params, key):
        """(next token, logits [V], state) after ``token``."""
        return self.decode_hidden(state, token, params, key)[:3]

    def decode_hidden(self, state, token, params, key):
        """(next token, logits [V], state, final HC state of ``token``)."""
        kind, params = self._sampling(params)
        return self.program("decode", kind)(self.weights, state, jnp.asarray(token, jnp.int32), params, key)

    def new_io(self, token: int = 0, steps: int = 0) -> dict:
        """The token-and-outputs buffer of ``decode_fed``: the next input token, the logits [V]
        and the final HC state of the last token decoded; with ``steps``, also the tokens [steps]
        of ``decode_loop``."""
        c = self.cfg
        io = {  # host arrays put on the device: no program to compile per shape, as jnp.zeros has
            "token": np.asarray(token, np.int32),
            "logits": np.zeros((c.n_vocab,), np.float32),
            "hidden": np.zeros((c.n_hc, c.n_embd), np.float32),
        }
        if steps:
            io["tokens"] = np.zeros((steps,), np.int32)
        return jax.device_put(io)

    def decode_fed(self, state, io, params, key):
        """(state, io) after decoding ``io["token"]``: the next token, its logits and the HC
        state in ``io`` (``new_io``); both arguments are donated. The same bits as ``decode``,
        with the token kept on the device between steps."""
        kind, params = self._sampling(params)
        return self.program("decode_fed", kind)(self.weights, state, io, params, key)

    def decode_loop(self, state, io, params, key, steps: int):
        """(state, io) after ``steps`` decode_fed steps in one program, starting from
        ``io["token"]``: the tokens in ``io["tokens"]`` (io from ``new_io(token, steps)``), the
        last step's logits and HC state as ``decode_fed`` leaves them. Both are donated."""
        kind, params = self._sampling(params)
        return self.program(f"{_LOOP}{steps}", kind)(self.weights, state, io, params, key)

    def _sampling(self, params):
        """(sampler kind, params on the device) for ``SamplingParams.arrays()``: the kind is read
        from the host values and the device copies are kept, so a decode step sends nothing
        (device arrays work too, at the cost of reading them back)."""
        host = tuple(np.asarray(p) for p in params)
        k = tuple((h.dtype.str, h.item()) for h in host)
        if k not in self._params:
            self._params[k] = (kind_of(host), jax.device_put(host))
        return self._params[k]

    def generate(
        self,
        prompt: list[int],
        n_predict: int,
        sampling: SamplingParams,
        eos_id: int | None = None,
        on_token: Callable[[int], None] | None = None,
        keep_logits: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> Generation:
        self.check_prompt(prompt)
        params = sampling.validate().arrays()
        key = jax.random.key(sampling.seed)
        kind, _ = self._sampling(params)  # compile outside the timings
        k = 1 if keep_logits else self.steps_per_call
        self.compile(
            ["prefill_all" if keep_logits else "prefill"] + ([self.loop_program(k)] if n_predict > 1 else []), kind
        )
        t0 = time.perf_counter()
        tok, logits, state = self.prefill(
            self.new_state(), prompt, params, key, all_logits=keep_logits, progress=progress
        )
        tok = int(tok)
        t1 = time.perf_counter()
        out, rows, stop = self._continue(state, tok, len(prompt), n_predict, params, key, eos_id, on_token, keep_logits)
        t2 = time.perf_counter()
        all_rows = list(logits) + rows if keep_logits else None
        return Generation(list(prompt), out, all_rows, t1 - t0, t2 - t1, stop)

    def loop_program(self, k: int) -> str:
        """The decode program that runs ``k`` steps a call."""
        return "decode_fed" if k == 1 else f"{_LOOP}{k}"

    def continue_generation(
        self,
        state,
        token: int,
        pos: int,
        n_predict: int,
        sampling: SamplingParams,
        eos_id: int | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> tuple[list[int], str]:
        """``generate`` from a prefilled ``state`` (donated) at position ``pos`` whose prefill chose
        ``token``: (the ids, ``token`` first, stop reason). Compiles the decode program first."""
        params = sampling.validate().arrays()
        kind, _ = self._sampling(params)
        if n_predict > 1:
            self.compile([self.loop_program(self.steps_per_call)], kind)
        out, _, stop = self._continue(
            state, int(token), pos, n_predict, params, jax.random.key(sampling.seed), eos_id, on_token, False
        )
        return out, stop

    def _continue(self, state, tok: int, pos: int, n_predict: int, params, key, eos_id, on_token, keep_logits):
        """The decode loop after a prefill at position ``pos`` chose ``tok``: (ids, logits rows of
        the generated tokens (``keep_logits``), stop reason)."""
        # K decode steps a call; every step's logits row only from decode_fed (K = 1)
        k = 1 if keep_logits else self.steps_per_call
        all_rows: list = []
        out: list[int] = []
        stop = "n_predict"
        # One call in flight ahead of the tokens the host reads: the tokens stay on the device
        # (decode_fed / decode_loop), so the host dispatches call c+1 while the GPU runs call c,
        # and a call costs max(host, GPU) instead of their sum. Whether a step is needed depends
        # on the tokens only through EOS, so at most 2K - 1 steps past an EOS run and are dropped
        # (their state too: ``generate`` keeps none). A call's steps past the context (its first
        # step fits) write clamped rows of that discarded state; their tokens are never read.
        steps = n_predict if keep_logits else n_predict - 1  # keep_logits: the last token's row too
        io = self.new_io(tok, 0 if k == 1 else k)
        sent, calls = 0, collections.deque()

        def fits(i: int) -> bool:  # the step that takes generated token i has a context row
            return pos + i < self.ctx

        def dispatch() -> None:
            nonlocal state, io, sent
            if sent < steps and fits(sent):
                if k == 1:
                    state, io = self.decode_fed(state, io, params, key)
                else:
                    state, io = self.decode_loop(state, io, params, key, k)
                calls.append(peek(io, keep_logits))  # copies: the next call takes io
                sent += k

        def results():  # (token, logits row or None) of each step, in order
            dispatch()
            while calls:
                dispatch()  # the next call, before this one is read
                toks, row = calls.popleft()
                for t in np.asarray(toks).tolist():
                    yield t, (np.asarray(row) if keep_logits else None)

        produced = results()
        while len(out) < n_predict:
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            if eos_id is not None and tok == eos_id:
                stop = "eos"
                break
            if len(out) == n_predict:
                break
            if not fits(len(out) - 1):
                stop = "ctx"
                break
            tok, row = next(produced)
            if keep_logits:
                all_rows.append(row)
        if keep_logits and len(all_rows) < len(out) and fits(len(out) - 1):
            all_rows.append(next(produced)[1])  # the last token's row (its step was dispatched)
        return out, all_rows, stop
