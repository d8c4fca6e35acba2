"""The engine's XLA runtime options: added where they apply, known to the installed jaxlib."""

import subprocess
import sys

from ds4jax import xla_options


def test_configure_adds_the_options_only_where_they_apply():
    both = "--xla_gpu_command_buffer_update_mode=SKIP_TEMP --xla_gpu_command_buffer_scheduling_mode=CONCURRENT"
    env = {}
    assert xla_options.configure(env, jaxlib_version="0.11.2")
    assert env["XLA_FLAGS"] == both
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x", "JAX_PLATFORMS": "cuda"}
    assert xla_options.configure(env, jaxlib_version="0.12.0.1")
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x " + both
    # the user's choice of one option stands; the other is still added
    mine = {"XLA_FLAGS": "--xla_gpu_command_buffer_update_mode=ALWAYS_UPDATE"}
    assert xla_options.configure(mine, jaxlib_version="0.11.2")
    assert mine == {
        "XLA_FLAGS": "--xla_gpu_command_buffer_update_mode=ALWAYS_UPDATE " + both.split()[1],
        "XLA_PYTHON_CLIENT_MEM_FRACTION": xla_options.MEM_FRACTION,
    }
    frac = {"XLA_PYTHON_CLIENT_MEM_FRACTION": ".5"}  # the user's memory share stands too
    xla_options.configure(frac, jaxlib_version="0.11.2")
    assert frac["XLA_PYTHON_CLIENT_MEM_FRACTION"] == ".5"
    assert not xla_options.configure(mine, jaxlib_version="0.11.2")  # both set now: nothing to add
    for env, version in (({"JAX_PLATFORMS": "cpu"}, "0.11.2"), ({}, "0.10.9")):  # no GPU; an XLA without it
        assert not xla_options.configure(env, jaxlib_version=version) and "XLA_FLAGS" not in env
    cpu = {"JAX_PLATFORMS": "cpu"}
    xla_options.configure(cpu, jaxlib_version="0.11.2")
    assert cpu == {"JAX_PLATFORMS": "cpu"}  # no GPU: the environment stays as it is


def test_the_installed_jaxlib_knows_the_options():
    """XLA aborts on a flag it does not know: start JAX with them (on the CPU, where they change
    nothing) and run a computation."""
    code = "import jax.numpy as jnp; print(int(jnp.arange(4).sum()))"
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(xla_options.FLAGS), "PATH": ""}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert (r.returncode, r.stdout.strip()) == (0, "6"), r.stderr[-500:]
