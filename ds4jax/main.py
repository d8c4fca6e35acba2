"""ds4jax command line.

    python -m ds4jax.main --prompt "Hello" --n_predict 32     # the embedded default model
    python -m ds4jax.main --model M.gguf --mtp M-mtp.gguf --prompt_file p.txt
    python -m ds4jax.main --prompt_ids 0,15,27 --temp 0 --dump_logits out.npz
    python -m ds4jax.main --summary                            # shapes, types, bytes
    python -m ds4jax.main                                      # interactive chat (/help)

Text prompts are rendered with ds4's chat template; generated text streams to stdout,
statistics go to stderr. Bad flags, files or prompts print one line and exit non-zero.
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags

from ds4jax.cli import define_engine_flags, model_paths, parse_flags, read_text, run_program
from ds4jax.errors import DS4Error

PROG = "ds4jax"

define_engine_flags(mtp_draft=2)

flags.DEFINE_string("prompt", None, "user prompt (rendered with the chat template)")
flags.DEFINE_string("prompt_file", None, "read the user prompt from this file")
flags.DEFINE_string("prompt_ids", None, "raw token ids, comma separated (no chat template)")
flags.DEFINE_string("system", None, "system prompt (default: ds4's 'You are a helpful assistant')")
flags.DEFINE_enum("think", "none", ["none", "high", "max"], "thinking mode of the chat template")
flags.DEFINE_integer("n_predict", 256, "tokens to generate at most")
flags.DEFINE_integer("ctx", 4096, "context size in tokens (prompt + generation)")
flags.DEFINE_float("temp", 1.0, "sampling temperature; 0 = greedy")
flags.DEFINE_integer("top_k", 0, "keep the k most likely tokens (0 = off)")
flags.DEFINE_float("top_p", 1.0, "nucleus sampling threshold (1 = off)")
flags.DEFINE_float("min_p", 0.05, "drop tokens less likely than min_p times the top token")
flags.DEFINE_integer("seed", 0, "sampling seed (0 = from the clock)")
flags.DEFINE_string("dump_logits", None, "save tokens (int32) and logits (float32, one row per token) to this .npz")
flags.DEFINE_bool("act_quant", True, "quantize activations to int8 blocks before quantized matmuls (ds4 CPU/CUDA)")
flags.DEFINE_bool("quality", False, "strict mode: the N=1 program token by token (also DS4JAX_MTP_STRICT=1)")
flags.DEFINE_bool("summary", False, "print the model summary and exit")
flags.DEFINE_bool("load", True, "with --summary: also repack all tensors into quant planes on the device")

FLAGS = flags.FLAGS


def _summary(mf) -> None:
    from ds4jax.summary import model_summary

    print(model_summary(mf))
    if FLAGS.load:
        import jax

        from ds4jax.weights import load_weights

        t0 = time.perf_counter()
        jax.block_until_ready(load_weights(mf))
        dev = jax.devices()[0]
        print(f"loaded     {time.perf_counter() - t0:.2f} s into quant planes on {dev.platform}:{dev.id}")


def _prompt_ids(mf, tokenizer) -> list[int]:
    given = [n for n in ("prompt", "prompt_file", "prompt_ids") if getattr(FLAGS, n) is not None]
    if len(given) > 1:
        raise DS4Error(f"give only one of --{', --'.join(given)}")
    if FLAGS.prompt_ids is not None:
        try:
            return [int(t) for t in FLAGS.prompt_ids.replace(" ", "").split(",") if t != ""]
        except ValueError:
            raise DS4Error(f"--prompt_ids must be comma-separated integers, got {FLAGS.prompt_ids!r}") from None
    text = FLAGS.prompt if FLAGS.prompt_file is None else read_text(FLAGS.prompt_file, "prompt_file")
    if tokenizer is None:
        raise DS4Error(f"{mf.base.path} has no tokenizer metadata: use --prompt_ids")
    from ds4jax.chat import DEFAULT_SYSTEM, render_prompt

    system = DEFAULT_SYSTEM if FLAGS.system is None else FLAGS.system
    return render_prompt(tokenizer, text, system=system, think=FLAGS.think, ctx=FLAGS.ctx)


def _runner(mf, ctx: int, eos: int | None, weights=None):
    """(engine, run(ids, on_token, keep_logits) -> generation, mode) for the flags given."""
    from ds4jax.engine import Engine
    from ds4jax.sampling import SamplingParams
    from pallas_kernels import dispatch as kernels

    seed = FLAGS.seed if FLAGS.seed != 0 else int(time.time_ns() & 0x7FFFFFFF)
    sampling = SamplingParams(FLAGS.temp, FLAGS.top_k, FLAGS.top_p, FLAGS.min_p, seed).validate()
    if FLAGS.n_predict < 0:
        raise DS4Error(f"--n_predict must be >= 0, got {FLAGS.n_predict}")
    if FLAGS.mtp_draft not in (0, 2):
        raise DS4Error(f"--mtp_draft must be 0 or 2 (the N=2 combined verifier), got {FLAGS.mtp_draft}")
    kernels.mode()  # a bad DS4JAX_KERNELS is one line here, not an error inside a compile
    engine = Engine(
        mf,
        ctx=ctx,
        chunk=FLAGS.chunk,
        act_quant=FLAGS.act_quant,
        weights=weights,
        expert_layout=FLAGS.expert_layout,
        steps_per_call=FLAGS.steps_per_call,
    )
    if weights is None:
        _layout_note(engine.weights)
    strict = FLAGS.quality or os.environ.get("DS4JAX_MTP_STRICT", "") not in ("", "0")
    spec = None
    if mf.mtp is not None and FLAGS.mtp_draft == 2 and not strict and FLAGS.dump_logits is None:
        if sampling.greedy:
            from ds4jax.speculative import MTPSpeculativeDecoder

            spec = MTPSpeculativeDecoder(engine, margin=FLAGS.mtp_margin)
        else:
            print(
                f"{PROG}: warning: MTP speculative decoding needs greedy decoding (--temp 0); decoding without it",
                file=sys.stderr,
            )
    mode = "speculative (MTP, N=2 verifier)" if spec is not None else ("strict N=1" if strict else "plain")

    def progress(done: int, total: int) -> None:
        if total > 4 * engine.chunk and sys.stderr.isatty():
            width = 30
            fill = width * done // total
            sys.stderr.write(f"\rprefill [{'#' * fill}{'.' * (width - fill)}] {done}/{total}")
            if done == total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    def run(ids, on_token, keep_logits=False):
        engine.check_prompt(ids)
        if spec is not None:
            return spec.generate(ids, FLAGS.n_predict, eos_id=eos, on_token=on_token)
        return engine.generate(
            ids, FLAGS.n_predict, sampling, eos_id=eos, on_token=on_token, keep_logits=keep_logits, progress=progress
        )

    return engine, run, mode


def _report(g, n_prompt: int, mode: str) -> None:
    n_dec = max(len(g.tokens) - 1, 0)
    prefill_tps = n_prompt / g.prefill_s if g.prefill_s > 0 else float("inf")
    print(
        f"{mode}: prompt {n_prompt} tokens, prefill {g.prefill_s:.2f} s ({prefill_tps:.1f} tokens/s); "
        f"generated {len(g.tokens)} tokens, {n_dec} after the first in {g.decode_s:.2f} s ({g.decode_tps:.1f} tokens/s); "
        f"stop: {g.stop}",
        file=sys.stderr,
    )
    stats = getattr(g, "stats", None)
    if stats is not None:
        print(
            f"mtp: drafts proposed {stats.proposed}, accepted {stats.accepted} ({100 * stats.acceptance:.1f}%), "
            f"{g.tokens_per_step:.2f} tokens per step ({stats.verify_steps} verify, {stats.plain_steps} plain)",
            file=sys.stderr,
        )


def _tokenizer(mf):
    from ds4jax.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(mf.base.metadata) if "tokenizer.ggml.tokens" in mf.base.metadata else None


def _generate(mf) -> None:
    import numpy as np

    from ds4jax.engine import check_prompt
    from ds4jax.tokenizer import StreamDecoder

    tokenizer = _tokenizer(mf)
    ids = _prompt_ids(mf, tokenizer)
    check_prompt(ids, FLAGS.ctx, mf.config.n_vocab)  # before any warning or compile
    eos = tokenizer.eos_id if tokenizer is not None else None
    _engine, run, mode = _runner(mf, FLAGS.ctx, eos)
    stream = StreamDecoder(tokenizer) if tokenizer is not None else None

    def on_token(t: int) -> None:
        if stream is not None:
            if t != eos:
                sys.stdout.write(stream.feed(t))
        else:
            sys.stdout.write(f"{t} ")
        sys.stdout.flush()

    try:
        g = run(ids, on_token, keep_logits=FLAGS.dump_logits is not None)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        print(f"{PROG}: stopped", file=sys.stderr)
        return
    if stream is not None:
        sys.stdout.write(stream.flush())
    sys.stdout.write("\n")
    sys.stdout.flush()
    _report(g, len(ids), mode)
    if FLAGS.dump_logits is not None:
        tokens = np.asarray(list(ids) + g.tokens, np.int32)
        logits = np.stack(g.logits).astype(np.float32)
        try:
            np.savez(FLAGS.dump_logits, tokens=tokens, logits=logits)
        except OSError as e:
            raise DS4Error(f"cannot write --dump_logits {FLAGS.dump_logits}: {e.strerror}") from None
        print(f"wrote {FLAGS.dump_logits}: tokens {tokens.shape}, logits {logits.shape}", file=sys.stderr)


def _layout_note(weights) -> None:
    """One line when --expert_layout (nib, or auto on a GPU) could repack only some expert tensors."""
    from ds4jax import xla_options
    from ds4jax.quant.layouts import expert_layout_counts, resolve_layout

    done, total = expert_layout_counts(weights)
    if resolve_layout(FLAGS.expert_layout) == "nib" and done < total:
        print(
            f"note: --expert_layout={FLAGS.expert_layout} repacked {done} of {total} expert tensors as nibbles (the "
            "device's free memory); the rest stay IQ2_XXS, with the same results (XLA_PYTHON_CLIENT_MEM_FRACTION, "
            f"{xla_options.MEM_FRACTION} unless set, caps JAX's share; the whole q2 model as nibbles needs ~0.97 of "
            "an H200)",
            file=sys.stderr,
        )


def _chat(mf) -> None:
    from ds4jax.chat import DEFAULT_SYSTEM
    from ds4jax.repl import ChatSession

    tokenizer = _tokenizer(mf)
    if tokenizer is None:
        raise DS4Error(f"{mf.base.path} has no tokenizer metadata: chat needs one (use --prompt_ids)")
    from ds4jax.engine import load_for_engine

    # loaded (and the experts repacked) once here: the engines made per context size share them
    weights = load_for_engine(mf, mf.config, FLAGS.ctx, FLAGS.chunk, FLAGS.expert_layout)
    _layout_note(weights)

    def make(ctx: int):
        _, run, _ = _runner(mf, ctx, tokenizer.eos_id, weights=weights)
        return lambda ids, on_token: run(ids, on_token)

    system = DEFAULT_SYSTEM if FLAGS.system is None else FLAGS.system
    ChatSession(tokenizer, system, FLAGS.think, FLAGS.ctx, make).run()


def main(argv: list[str] | None = None) -> int:
    parse_flags(list(argv if argv is not None else sys.argv), PROG)
    return run_program(PROG, FLAGS.compile_cache, _main)


def _main() -> None:
    from ds4jax.model_file import open_model

    mf = open_model(*model_paths(FLAGS.model, FLAGS.mtp))
    if FLAGS.summary:
        _summary(mf)
    elif all(getattr(FLAGS, n) is None for n in ("prompt", "prompt_file", "prompt_ids")):
        _chat(mf)
    else:
        _generate(mf)


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
