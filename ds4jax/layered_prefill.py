"""The prefill as one compiled program per kind of block instead of one program for the model.

XLA compiles the whole model as one program in time that grows faster than the block count: the
full-size prefill program took over 8 minutes on an H200's host (session 36), where a block's
share is ~6.5 s (3 blocks 21 s, 8 blocks 54 s). DeepSeek V4 Flash has 43 blocks of 4 kinds (the
two first blocks, the hash-routed ratio-4 block, then ratio-128 and ratio-4 blocks in turn:
``forward.layer_kind``), so one program per kind, an embedding program and a head program cover
the model. A chunk then runs 2 + n_layer calls, dispatched back to back without waiting (a
full-size chunk of 64 tokens takes ~0.2 s of GPU time, the calls ~1-2 ms of host time).

Each block's program runs ``forward.layer_committed``: the block's ops and its state commit,
the same functions as the whole-model program, whose results are bit-stable however XLA fuses
them (``model.numerics``), so both prefill forms give the same bits (tests). Decode stays one
program a step: a step takes ~8 ms, where 45 dispatches would cost ~3-6 ms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ds4jax.config import ModelConfig
from ds4jax.model.forward import embed, head, layer_committed, layer_kind
from ds4jax.sampling import sample

HEAD_KEYS = ("output_hc_fn", "output_hc_scale", "output_hc_base", "output_norm", "output")
PREFIX = "prefill."  # the programs' names: PREFIX + embed, layer<i>, head or head_all
EMBED, HEAD, HEAD_ALL, LAYER = PREFIX + "embed", PREFIX + "head", PREFIX + "head_all", PREFIX + "layer"
SAMPLER_FREE = (EMBED, LAYER)  # names (or prefixes) of programs the sampler does not change


def _embed(n_hc: int, token_embd, tokens):
    return embed({"token_embd": token_embd}, tokens, n_hc)


def chunk_head(cfg: ModelConfig, logits_rows: str, sampler: str, weights, H, n_valid, pos, params, key):
    """A prefill chunk's end from its final HC states H: (the next token, the logits of its last
    valid row or of every row, that row's HC state); ``pos``: the tokens after the chunk."""
    h_last = jax.lax.dynamic_index_in_dim(H, n_valid - 1, axis=0, keepdims=False)
    logits = head(cfg, weights, h_last if logits_rows == "last" else H)
    last = logits if logits_rows == "last" else logits[n_valid - 1]
    return sample(last, params, jax.random.fold_in(key, pos), sampler), logits, h_last


def _head(cfg: ModelConfig, logits_rows: str, sampler: str, weights, H, pos0, n_valid, params, key):
    """(token, logits, n_tokens after the chunk, the last valid row's HC state) as
    ``engine._prefill`` returns them."""
    pos = pos0 + n_valid
    tok, logits, h_last = chunk_head(cfg, logits_rows, sampler, weights, H, n_valid, pos, params, key)
    return tok, logits, pos, h_last


def _signature(tree) -> tuple:
    return jax.tree.structure(tree), tuple((x.shape, x.dtype) for x in jax.tree.leaves(tree))


class LayeredPrefill:
    """The programs of a layered prefill for one engine (its config, weights, state and chunk):
    ``names(all_logits)``, ``lower(name, sampler)`` and ``run`` over their compiled executables.

    Blocks share a program when their kind and the shapes of their weights and state agree (an
    expert tensor left in the stored layout where memory did not allow nibbles is another shape);
    the first block's program is a separate one on the kernel path, where the blocks after it take
    the previous post-mix's sums of squares and it does not."""

    def __init__(self, cfg: ModelConfig, weights: dict, state_shapes: dict, chunk: int):
        self.cfg, self.weights, self.chunk = cfg, weights, chunk
        self.state_shapes = state_shapes
        self.head_weights = {k: weights[k] for k in HEAD_KEYS}
        # abstract inputs: a scalar, the chunk's tokens, its HC states
        S = jax.ShapeDtypeStruct
        self._i32, self._tokens = S((), jnp.int32), S((chunk,), jnp.int32)
        self._H = S((chunk, cfg.n_hc, cfg.n_embd), jnp.float32)
        # the sums of squares a block after the first takes (None off the kernel path)
        self.squares = jax.eval_shape(self._layer_fn(0), *self._layer_args(0, None))[2]
        self.program_of: list[str] = []  # block L -> its program's name
        self.first_block: dict[str, int] = {}  # program name -> the block it is lowered for
        seen: dict = {}
        for L in range(cfg.n_layer):
            sig = (
                layer_kind(cfg, L),
                L == 0 and self.squares is not None,
                _signature(weights["layers"][L]),
                _signature(state_shapes["layers"][L]),
            )
            if sig not in seen:
                seen[sig] = f"{LAYER}{len(seen)}"
                self.first_block[seen[sig]] = L
            self.program_of.append(seen[sig])

    def names(self, all_logits: bool) -> list[str]:
        return [EMBED, *self.first_block, HEAD_ALL if all_logits else HEAD]

    def _layer_fn(self, L: int):
        return lambda w, st, H, tokens, pos0, n, rope, squares: layer_committed(
            self.cfg, L, w, st, H, tokens, pos0, n, rope, squares
        )

    def _layer_args(self, L: int, squares):
        """Block L's program's abstract arguments (as ``run`` passes them)."""
        w, st = self.weights["layers"][L], self.state_shapes["layers"][L]
        return (w, st, self._H, self._tokens, self._i32, self._i32, self.weights["rope"], squares)

    def lower(self, name: str, sampler: str, params, key):
        """The program ``name`` traced and lowered (not compiled); ``params``/``key``: abstract
        sampling values for the head."""
        cfg = self.cfg
        if name == EMBED:
            return jax.jit(lambda e, t: _embed(cfg.n_hc, e, t)).lower(self.weights["token_embd"], self._tokens)
        if name in (HEAD, HEAD_ALL):
            rows = "last" if name == HEAD else "all"
            fn = jax.jit(lambda w, h, p, n, pr, k: _head(cfg, rows, sampler, w, h, p, n, pr, k), keep_unused=True)
            return fn.lower(self.head_weights, self._H, self._i32, self._i32, params, key)
        L = self.first_block[name]
        squares = None if L == 0 else self.squares
        # the block's state is donated: its new state takes the same buffers
        return jax.jit(self._layer_fn(L), donate_argnums=(1,), keep_unused=True).lower(*self._layer_args(L, squares))

    def run(self, programs: dict, sampler_head: str, state, tokens, n_valid, params, key):
        """One chunk: (token, logits, state, last valid row's HC state); ``programs``: name ->
        compiled executable for ``names``, ``sampler_head`` the head's name in it."""
        w = self.weights
        pos0 = state["n_tokens"]
        H = programs[EMBED](w["token_embd"], tokens)
        layers, squares = [], None
        for L, st in enumerate(state["layers"]):
            H, st, squares = programs[self.program_of[L]](
                w["layers"][L], st, H, tokens, pos0, n_valid, w["rope"], squares
            )
            layers.append(st)
        tok, logits, n_tokens, h_last = programs[sampler_head](self.head_weights, H, pos0, n_valid, params, key)
        return tok, logits, {"n_tokens": n_tokens, "layers": tuple(layers)}, h_last
