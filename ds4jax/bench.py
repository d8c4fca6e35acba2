"""ds4jax's bench: prefill and generation speed at growing context frontiers, as ds4-bench measures.

    python -m ds4jax.bench --prompt_file text.txt --ctx_start 2048 --ctx_max 32768 --csv speed-bench/run.csv --plot
    python -m ds4jax.bench --preset flash-q2 --ctx_max 8192 --gen_tokens 128   # full size, random weights on the GPU
    python -m ds4jax.bench --mtp_draft 2 ...                                     # generation by MTP speculation

One session walks the prompt's frontiers F = ctx_start, then F + step_incr (or ceil(F · step_mul)
with step_mul > 1), ending exactly at ctx_max. At each frontier it times the prefill of the tokens
since the previous frontier (the state keeps what came before, so only F - previous is prefilled),
then the generation of ``gen_tokens`` greedy tokens from a copy of that state (the frontier's state
stays for the next prefill, as ds4-bench restores its snapshot). EOS does not stop a generation.
Each frontier gives one CSV row in ds4-bench's format,

    ctx_tokens,prefill_tokens,prefill_tps,gen_tokens,gen_tps,kvcache_bytes

with ``kvcache_bytes`` the bytes of the state's live part at F (the raw window's filled rows, the
compressed and indexer rows made so far, the compressor frontiers), so ds4's plots and tools read
it; ``--plot`` draws it (``ds4jax.speed_plot``). Compiles come first and are not timed; a short
warm-up run precedes the first frontier so no one-time cost lands in its row.

The prompt: ``--prompt_file`` (raw text, tokenized as it is), ``--chat_prompt_file`` (one user
message in the chat template, no thinking), or by default ``ctx_max`` random token ids from
``--seed`` (the models made from presets have no tokenizer; timing does not depend on the ids).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable

from ds4jax.errors import DS4Error

PROG = "ds4jax.bench"
HEADER = ("ctx_tokens", "prefill_tokens", "prefill_tps", "gen_tokens", "gen_tps", "kvcache_bytes")


def frontiers(start: int, end: int, incr: int, mul: float) -> list[int]:
    """ctx_start, next(ctx_start), ... while <= ctx_max, and ctx_max last: next(F) = F + incr with
    mul = 1, else max(ceil(F · mul), F + 1)."""
    if start < 1 or end < start:
        raise DS4Error(f"need 1 <= --ctx_start <= --ctx_max, got {start} and {end}")
    if incr < 1:
        raise DS4Error(f"--step_incr must be >= 1, got {incr}")
    if not mul >= 1.0:
        raise DS4Error(f"--step_mul must be >= 1, got {mul}")
    out = [start]
    while out[-1] < end:
        f = out[-1]
        nxt = f + incr if mul == 1.0 else max(math.ceil(f * mul), f + 1)
        out.append(min(nxt, end))
    return out


def live_state_bytes(state, cfg, n: int) -> int:
    """Bytes of ``state``'s rows that hold something after ``n`` tokens (shapes are enough: a state
    or its ``jax.eval_shape``): the raw window's min(n, rows), a compressed table's n // ratio rows,
    whole compressor frontiers, the token counter."""
    total = state["n_tokens"].dtype.itemsize
    for L, layer in enumerate(state["layers"]):
        for name, a in layer.items():
            row = a.dtype.itemsize * math.prod(a.shape[1:])
            if name == "raw":
                total += min(n, a.shape[0]) * row
            elif name in ("comp", "idx"):
                total += min(n // cfg.ratio(L), a.shape[0]) * row
            else:
                total += a.shape[0] * row
    return total


@dataclasses.dataclass
class Row:
    ctx_tokens: int
    prefill_tokens: int
    prefill_s: float
    gen_tokens: int  # tokens the generation produced (the prefill's token not counted)
    gen_s: float
    kvcache_bytes: int
    tokens: list[int]  # the prefill's token, then the generated ones
    drafts: tuple[int, int, int, int] | None = None  # MTP: proposed, accepted, verify steps, plain steps
    step_s: tuple[float, ...] = ()  # MTP: each step's seconds as the host saw them (``SpecStats.step_s``)

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_s

    @property
    def gen_tps(self) -> float:
        return self.gen_tokens / self.gen_s

    def csv_fields(self) -> list[str]:
        return [
            str(self.ctx_tokens),
            str(self.prefill_tokens),
            f"{self.prefill_tps:.2f}",
            str(self.gen_tokens),
            f"{self.gen_tps:.2f}",
            str(self.kvcache_bytes),
        ]


def copy_tree(tree):
    """A device copy of every array (ready): the generation takes (donates) the copy, the
    frontier's state stays for the next prefill."""
    import jax

    return jax.block_until_ready(jax.tree.map(lambda a: a.copy(), tree))


def check_plan(n_ids: int, points: list[int], gen_tokens: int, ctx: int, steps_per_call: int, mtp: bool) -> None:
    """One-line errors for a bench that cannot run as asked (checked before the weights load)."""
    if steps_per_call < 1:
        raise DS4Error(f"--steps_per_call must be >= 1, got {steps_per_call}")
    if gen_tokens < 1:
        raise DS4Error(f"--gen_tokens must be >= 1, got {gen_tokens}")
    if not mtp and gen_tokens % steps_per_call:
        raise DS4Error(
            f"--gen_tokens ({gen_tokens}) must be a multiple of --steps_per_call ({steps_per_call}): "
            "the decode program runs that many steps a call"
        )
    if n_ids < points[-1]:
        raise DS4Error(f"the prompt has {n_ids} tokens; --ctx_max {points[-1]} needs at least that many")
    if points[-1] + gen_tokens >= ctx:
        raise DS4Error(
            f"the context ({ctx} tokens, --ctx_alloc) must exceed --ctx_max + --gen_tokens ({points[-1]} + {gen_tokens})"
        )


def programs(engine, mtp: bool) -> list[str]:
    """The engine programs a bench runs (the MTP step is the speculative decoder's own)."""
    return ["prefill"] + ([] if mtp else [engine.loop_program(engine.steps_per_call)])


def run_bench(
    engine,
    ids: list[int],
    points: list[int],
    gen_tokens: int,
    spec=None,
    on_row: Callable[[Row], None] | None = None,
    warmup: bool = True,
) -> list[Row]:
    """Time the prefill and generation at each frontier of ``points`` (``frontiers``) over the
    prompt ``ids``; ``spec``: an ``MTPSpeculativeDecoder`` on ``engine`` generates instead of the
    plain decode loop. ``on_row`` sees each row as it is made."""
    import jax

    from ds4jax.sampling import SamplingParams

    check_plan(len(ids), points, gen_tokens, engine.ctx, engine.steps_per_call, spec is not None)
    greedy = SamplingParams(temperature=0.0)
    params, key = greedy.arrays(), jax.random.key(0)
    engine.compile(programs(engine, spec is not None))
    shapes = jax.eval_shape(engine.new_state)

    def generate(state, tok: int, pos: int):
        """(tokens, seconds, draft counts) of ``gen_tokens`` tokens from ``state`` (donated)."""
        if spec is not None:
            tokens, stats, _, secs = spec.continue_from(state, tok, engine.last_hidden, pos, gen_tokens + 1)
            drafts = (stats.proposed, stats.accepted, stats.verify_steps, stats.plain_steps)
            return tokens, secs, drafts, tuple(stats.step_s)
        t0 = time.perf_counter()
        tokens, _ = engine.continue_generation(state, tok, pos, gen_tokens + 1, greedy)
        return tokens, time.perf_counter() - t0, None, ()

    if warmup:  # one chunk and a few steps, untimed: first-call costs (small jits, transfers) land here
        n = min(engine.chunk, points[0])
        tok, _, state = engine.prefill(engine.new_state(), ids[:n], params, key)
        generate(state, int(tok), n)
    rows: list[Row] = []
    state, prev = engine.new_state(), 0
    for f in points:
        t0 = time.perf_counter()
        tok, _, state = engine.prefill(state, ids[prev:f], params, key)
        tok = int(tok)  # waits for the last chunk
        prefill_s = time.perf_counter() - t0
        tokens, gen_s, drafts, step_s = generate(copy_tree(state), tok, f)
        live = live_state_bytes(shapes, engine.cfg, f)
        row = Row(f, f - prev, prefill_s, len(tokens) - 1, gen_s, live, tokens, drafts, step_s)
        rows.append(row)
        if on_row is not None:
            on_row(row)
        prev = f
    return rows


def csv_line(fields) -> str:
    return ",".join(fields) + "\n"


def csv_text(rows: list[Row]) -> str:
    """ds4-bench's CSV: the header, then a line a frontier."""
    return "".join(csv_line(f) for f in [HEADER, *(r.csv_fields() for r in rows)])


# ---- the command line ---------------------------------------------------------------------
def _define_flags() -> None:
    """Defined when the bench runs as a program (``ds4jax.main`` defines some of the same names)."""
    from absl import flags

    from ds4jax.cli import define_engine_flags

    define_engine_flags(mtp_draft=0)  # --model, --mtp, --chunk, --steps_per_call, --mtp_draft/margin, ...
    flags.DEFINE_string(
        "preset", None, "benchmark a preset's shapes with random weights made on the device (flash-q2, ...)"
    )
    flags.DEFINE_integer("layers", 0, "with --preset: keep its first N blocks (0: all)")
    flags.DEFINE_string("prompt_file", None, "raw text, tokenized as it is")
    flags.DEFINE_string("chat_prompt_file", None, "text rendered as one user message of the chat template")
    flags.DEFINE_string("system", None, "with --chat_prompt_file: the system prompt (default: ds4's)")
    flags.DEFINE_integer("seed", 1, "without a prompt file: the seed of the random token ids")
    flags.DEFINE_integer("ctx_start", 2048, "first frontier (tokens)")
    flags.DEFINE_integer("ctx_max", 32768, "last frontier (the prompt must have at least this many tokens)")
    flags.DEFINE_integer("ctx_alloc", 0, "the session's context (0: ctx_max + gen_tokens + 1)")
    flags.DEFINE_integer("step_incr", 2048, "frontier step with --step_mul 1")
    flags.DEFINE_float("step_mul", 1.0, "next frontier = ceil(F * step_mul) when above 1")
    flags.DEFINE_integer("gen_tokens", 128, "tokens generated at each frontier")
    flags.DEFINE_string("csv", None, "write the CSV here (default: stdout)")
    flags.DEFINE_bool("plot", False, "with --csv: also write <stem>_ts.svg beside it (ds4jax.speed_plot)")


def _prompt(F, cfg, mf, n_ids: int) -> list[int]:
    files = [n for n in ("prompt_file", "chat_prompt_file") if getattr(F, n) is not None]
    if len(files) > 1:
        raise DS4Error("give only one of --prompt_file, --chat_prompt_file")
    if not files:
        import numpy as np

        return np.random.default_rng(F.seed).integers(0, cfg.n_vocab, n_ids).tolist()
    from ds4jax.cli import read_text

    text = read_text(getattr(F, files[0]), files[0])
    if mf is None or "tokenizer.ggml.tokens" not in mf.base.metadata:
        raise DS4Error(f"--{files[0]} needs a model with a tokenizer (a GGUF); presets have none")
    from ds4jax.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_metadata(mf.base.metadata)
    if files[0] == "prompt_file":
        return tok.encode(text)
    from ds4jax.chat import DEFAULT_SYSTEM, render_prompt

    return render_prompt(tok, text, system=DEFAULT_SYSTEM if F.system is None else F.system, think="none")


def _open(F):
    """(config, model files or None, preset or None) for the flags: nothing is loaded yet."""
    if F.preset is not None:
        if F.model is not None or F.mtp is not None:
            raise DS4Error("--preset benchmarks random weights: give it without --model and --mtp")
        from ds4jax.presets import load_preset, preset_config, with_layers

        p = load_preset(F.preset)
        if F.layers:
            p = with_layers(p, F.layers)
        return preset_config(p), None, p
    if F.layers:
        raise DS4Error("--layers applies to --preset only")
    from ds4jax.cli import model_paths
    from ds4jax.model_file import open_model

    model, mtp = model_paths(F.model, F.mtp)
    mf = open_model(model, mtp if F.mtp_draft == 2 else None)
    if F.mtp_draft == 2 and mf.mtp is None:
        raise DS4Error("--mtp_draft 2 needs an MTP GGUF (--mtp)")
    return mf.config, mf, None


def _load(F, cfg, mf, preset, ctx: int):
    """The engine: the model's weights loaded (or, for a preset, made on the device)."""
    from ds4jax.engine import Engine

    if preset is None:
        return Engine(mf, ctx=ctx, chunk=F.chunk, expert_layout=F.expert_layout, steps_per_call=F.steps_per_call)
    import types

    import jax

    from ds4jax.engine import layout_keep_free
    from ds4jax.quant.layouts import resolve_layout
    from ds4jax.random_weights import random_weights

    keep = layout_keep_free(cfg, ctx, min(F.chunk, ctx))
    layout = resolve_layout(F.expert_layout)
    w = random_weights(cfg, preset, seed=F.seed, mtp=F.mtp_draft == 2, expert_layout=layout, keep_free=keep)
    w = jax.block_until_ready(w)
    return Engine(types.SimpleNamespace(config=cfg), ctx=ctx, chunk=F.chunk, weights=w, steps_per_call=F.steps_per_call)


def _bench(F) -> None:
    import jax

    from ds4jax.engine import check_prompt

    if F.mtp_draft not in (0, 2):
        raise DS4Error(f"--mtp_draft must be 0 or 2 (the N=2 combined verifier), got {F.mtp_draft}")
    if F.plot and F.csv is None:
        raise DS4Error("--plot needs --csv (the plot goes beside it)")
    points = frontiers(F.ctx_start, F.ctx_max, F.step_incr, F.step_mul)
    ctx = F.ctx_alloc or points[-1] + F.gen_tokens + 1
    mtp = F.mtp_draft == 2
    cfg, mf, preset = _open(F)
    ids = _prompt(F, cfg, mf, points[-1])
    check_plan(len(ids), points, F.gen_tokens, ctx, F.steps_per_call, mtp)  # before the weights load
    check_prompt(ids[: points[-1]], ctx, cfg.n_vocab)
    eng = _load(F, cfg, mf, preset, ctx)
    spec = None
    if mtp:
        from ds4jax.speculative import MTPSpeculativeDecoder

        spec = MTPSpeculativeDecoder(eng, margin=F.mtp_margin)
    dev = jax.devices()[0]
    shapes = jax.eval_shape(eng.new_state)
    layer0 = shapes["layers"][0]
    comp = max((L["comp"].shape[0] for L in shapes["layers"] if "comp" in L), default=0)
    say = lambda s: print(f"{PROG}: {s}", file=sys.stderr, flush=True)
    from ds4jax.quant.planes import tree_nbytes

    say(
        f"context buffers {tree_nbytes(shapes) / 2**20:.1f} MiB (ctx {eng.ctx}, backend {dev.platform} "
        f"{dev.device_kind}, prefill_chunk {eng.chunk}, raw_kv_rows {layer0['raw'].shape[0]}, "
        f"compressed_kv_rows {comp})"
    )
    say(f"decode path = {'MTP speculative combined-forward' if mtp else 'plain'}; frontiers {points}")
    from ds4jax.random_weights import bytes_per_token

    wb = bytes_per_token(eng.weights, eng.cfg)  # the MTP block and the rope tables are not counted
    t0 = time.perf_counter()
    if spec is not None:  # the prefill, the first draft and the MTP step, side by side
        spec.compile()
    else:
        eng.compile(programs(eng, mtp))  # run_bench's, timed here
    say(f"compiled in {time.perf_counter() - t0:.1f} s")

    # rows are written as they come (a long sweep keeps what it measured if stopped)
    if F.csv is None:
        out = sys.stdout
    else:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(F.csv)), exist_ok=True)
            out = open(F.csv, "w", encoding="utf-8")  # noqa: SIM115 (closed below)
        except OSError as e:
            raise DS4Error(f"cannot write --csv {F.csv}: {e.strerror}") from None
    out.write(csv_line(HEADER))

    def on_row(r: Row) -> None:
        line = (
            f"ctx {r.ctx_tokens}: prefill {r.prefill_tokens} tokens {r.prefill_s:.3f} s ({r.prefill_tps:.1f} t/s); "
            f"gen {r.gen_tokens} tokens {r.gen_s:.3f} s ({r.gen_tps:.2f} t/s"
        )
        if r.drafts is None:  # GB/s of weights a plain step reads
            line += f", {wb * r.gen_tps / 1e9:.1f} GB/s of weights)"
        else:
            p, a, v, s = r.drafts
            line += f"; drafts {a}/{p} accepted, {v} verify + {s} plain steps"
            if r.step_s:  # the loop's steps as the host saw them: a slow start shows apart from the rest
                ms = sorted(1e3 * t for t in r.step_s)
                first, mid, top = 1e3 * r.step_s[0], ms[len(ms) // 2], ms[-1]
                line += f"; a step {mid:.2f} ms median, first {first:.2f}, slowest {top:.2f}"
            line += ")"
        say(line)
        out.write(csv_line(r.csv_fields()))
        out.flush()

    t0, compiled = time.perf_counter(), spec.compile_s if spec else 0.0
    try:
        rows = run_bench(eng, ids, points, F.gen_tokens, spec, on_row)
    finally:
        if out is not sys.stdout:
            out.close()
    late = spec.compile_s - compiled if spec else 0.0  # compiled above, so none unless shapes moved
    mtp_compile = f" (MTP compiles {late:.1f} s of it)" if late > 0 else ""
    say(f"{len(rows)} frontiers in {time.perf_counter() - t0:.1f} s{mtp_compile}; weights {wb / 1e9:.2f} GB a token")
    if F.csv is not None:
        say(f"wrote {F.csv}")
        if F.plot:
            from ds4jax.speed_plot import plot

            say(f"wrote {plot(F.csv)}")


def main(argv: list[str] | None = None) -> int:
    from absl import flags

    from ds4jax.cli import parse_flags, run_program

    _define_flags()
    parse_flags(list(argv if argv is not None else sys.argv), PROG)
    F = flags.FLAGS
    return run_program(PROG, F.compile_cache, lambda: _bench(F))


if __name__ == "__main__":
    sys.exit(main())
