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
    ~2.5: speed-bench/NOTES.md), a second start reads them back."""
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
