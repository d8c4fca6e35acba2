"""Shared fixtures: the tiny generated model (written once per test session)."""

import os
import sys
import tempfile

import pytest

# Generated models go to a per-session cache, never the user's ~/.cache. One cache for the whole
# run: with ``-n 2`` (pytest-xdist) the controller makes it and its workers, started after it,
# inherit the variable, so they share the model and the compiled programs.
_SESSION_CACHE = os.environ.get("DS4JAX_TEST_SESSION_CACHE") or tempfile.mkdtemp(prefix="ds4jax-test-cache-")
os.environ["DS4JAX_TEST_SESSION_CACHE"] = _SESSION_CACHE
os.environ["DS4JAX_CACHE"] = _SESSION_CACHE
os.environ.setdefault("JAX_PLATFORMS", "cpu")


# The test files that take longest on CPU (2 cores, one process each: ~500, ~570, ~290 and ~80 s of
# ~1,600 s in all), collected first. With ``-n 2 --dist loadfile`` and xdist's reordering off
# (pyproject's addopts), the workers take whole files in collection order, a worker its next file
# when two tests of its current one are left: test_forward and test_kernels start the two workers,
# test_mtp follows test_forward (which ends first) and finds the shared engine's programs there
# (``engine``), test_speculative goes to the kernels' worker, and the short files fill in after
# them. xdist's default order (files by their number of tests) put two long files on one worker.
LONGEST_FIRST = ("test_forward.py", "test_kernels.py", "test_mtp.py", "test_speculative.py")


def pytest_collection_modifyitems(items):
    names = {n: i for i, n in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: names.get(item.path.name, len(names)))  # stable: a file keeps its order


def pytest_configure(config):
    """Under xdist, the controller writes the tiny model once before the workers start (each
    would otherwise generate its own copy into the shared cache at the same time)."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        from ds4jax.default_model import default_model_paths

        default_model_paths(quiet=True)


@pytest.fixture(scope="session")
def tiny_paths():
    """(base, mtp) paths of the tiny preset, as the CLI's default model."""
    from ds4jax.default_model import default_model_paths

    return default_model_paths(quiet=True)


@pytest.fixture(scope="session")
def tiny_files(tiny_paths):
    from ds4jax.model_file import open_model

    return open_model(*tiny_paths)


# The context and prefill chunk of the shared engine below (and of the CLI runs that should find its
# programs in the compilation cache).
CTX, CHUNK = 512, 32


@pytest.fixture(scope="session")
def engine(tiny_files):
    """The tiny model's engine at CTX and CHUNK, one per process: the files that run on one worker
    (test_forward, test_speculative, ...) use its compiled programs instead of compiling or loading
    them again (a program is ~40 s to compile on the CI's CPU, ~10 s to load from the cache)."""
    from ds4jax.engine import Engine

    return Engine(tiny_files, ctx=CTX, chunk=CHUNK)


def run_cli(module, *args, env_extra=None, timeout=600, stdin=""):
    """Run ``python -m module args`` in a subprocess (``stdin`` as its input)."""
    import subprocess

    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        input=stdin,
    )


# Share compiled programs between the test process and the CLI subprocesses it starts.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_SESSION_CACHE, "jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
