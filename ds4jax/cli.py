"""absl flag parsing that fails with one line instead of absl's two-line FATAL."""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import flags

from ds4jax.errors import DS4Error


def parse_flags(argv: list[str], prog: str) -> list[str]:
    """Parse ``argv`` into absl's FLAGS; on a bad flag print one line and exit 2."""
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    if len(rest) > 1:
        print(
            f"{prog}: error: unexpected arguments: {' '.join(rest[1:])} (flags look like --name=value)", file=sys.stderr
        )
        sys.exit(2)
    return rest


def define_engine_flags(mtp_draft: int) -> None:
    """The flags ``ds4jax.main`` and ``ds4jax.bench`` share (the model, its engine, MTP), defined when a
    command runs (the two define them in one absl namespace, never in one process); ``mtp_draft``:
    the command's default."""
    flags.DEFINE_string("model", None, "base GGUF (default: the embedded default model)")
    flags.DEFINE_string("mtp", None, "MTP GGUF (default: the default model's MTP file when --model is not given)")
    flags.DEFINE_integer("chunk", 64, "prefill chunk size (tokens per compiled prefill step)")
    flags.DEFINE_integer(
        "steps_per_call",
        4,
        "decode steps per compiled program call, plain or MTP (tokens then stream in groups of this many "
        "steps; 1 = a call per step)",
    )
    flags.DEFINE_integer(
        "mtp_draft", mtp_draft, "MTP speculative decoding: 2 = verify [token, draft] in one N=2 forward; 0 = off"
    )
    flags.DEFINE_float("mtp_margin", 3.0, "draft only when the MTP's top-two logit margin is at least this")
    flags.DEFINE_enum(
        "expert_layout",
        "auto",
        ["auto", "gguf", "nib"],
        "routed experts' gate/up planes: IQ2_XXS repacked to nibbles as they load (the same results, 2.1x "
        "their memory, decoded on a GPU without table lookups: speed-bench/KERNELS.md) or as stored; "
        "auto = nibbles on a GPU, as far as its free memory allows, as stored on the CPU",
    )
    flags.DEFINE_string(
        "compile_cache",
        "",
        "directory that keeps compiled programs across runs (default: $JAX_COMPILATION_CACHE_DIR, else "
        "the ds4jax cache dir's xla/); 'off' = compile every run",
    )


def model_paths(model: str | None, mtp: str | None) -> tuple[str, str | None]:
    """(--model, --mtp) as given, or the embedded default model and its MTP file when --model is not
    given (an --mtp given alongside it stands)."""
    if model is None:
        from ds4jax.default_model import default_model_paths

        model, default_mtp = default_model_paths()
        mtp = mtp or str(default_mtp)
    return model, mtp


def read_text(path: str, flag: str) -> str:
    """The UTF-8 text of the file a flag names, or a one-line error naming the flag."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise DS4Error(f"cannot read --{flag} {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise DS4Error(f"--{flag} {path} is not UTF-8 text") from None


def fail(prog: str, message: object, code: int = 1) -> NoReturn:  # noqa: F821
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(code)


def device_error(e: Exception) -> DS4Error | None:
    """The one-line error for XLA running out of device memory past the check made before loading
    (``engine.check_fits``: a compile's temporaries, a long context's state), else None."""
    text = str(e).strip()
    if "RESOURCE_EXHAUSTED" not in text:
        return None
    return DS4Error(f"out of device memory: {text.splitlines()[0][:300]}")


def use_compile_cache(value: str) -> None:
    """Keep compiled programs on disk (``--compile_cache``: a directory, '' for the default, 'off'):
    the full model's programs take minutes to compile on an H200's host (decode loop ~1, MTP step
    ~2: speed-bench/NOTES.md), a second start reads them back."""
    if value == "off":
        return
    import jax

    from ds4jax.presets import default_cache_dir

    path = value or jax.config.jax_compilation_cache_dir or str(default_cache_dir() / "xla")
    jax.config.update("jax_compilation_cache_dir", path)


def run_program(prog: str, compile_cache: str, body: Callable[[], None]) -> int:
    """A command's frame once its flags are parsed: XLA's options (before JAX starts its GPU
    client), the compile cache, then ``body``; a ``DS4Error`` or running out of device memory is
    one line and exit 1, Ctrl-C exit 130."""
    from ds4jax import xla_options

    xla_options.configure()
    try:
        use_compile_cache(compile_cache)
        body()
    except DS4Error as e:
        fail(prog, e)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:
        err = device_error(e)
        if err is None:
            raise
        fail(prog, err)
    return 0
