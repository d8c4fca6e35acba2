"""Device memory left to JAX (ds4jax/device_memory.py): the allocator's statistics where they
exist, else (XLA's VMM allocator, which the engine's options select on a GPU) the driver's free
memory less the part outside JAX's share."""

import jax
import jax.numpy as jnp
import pytest

from ds4jax import device_memory as dm


def test_headroom_from_the_drivers_numbers():
    gib = 1 << 30
    # at the start of an H200 process: 150.1 GB free of 150.8, share 0.95 -> XLA's own budget then
    # (0.95 of the free memory: 142.6 GB) within 0.1 GB
    free, total = 143156 * (1 << 20), 143771 * (1 << 20)
    assert abs(dm.headroom_from(free, total, 0.95) - 142_604_384_514) < 0.1e9
    assert dm.headroom_from(10 * gib, 100 * gib, 0.95) == 5 * gib  # 5 GiB of the free 10 are outside the share
    assert dm.headroom_from(4 * gib, 100 * gib, 0.9) < 0  # already past the share: no room


def test_memory_headroom_where_no_one_says():
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU's case")
    assert dm.memory_headroom() is None
    assert dm.cuda_mem_info() is None or jax.default_backend() == "gpu"


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="a GPU's memory")
def test_memory_headroom_on_the_gpu_follows_allocations():
    """Under the engine's allocator options the statistics are missing; the driver's numbers are not."""
    before = dm.memory_headroom()
    x = jax.block_until_ready(jnp.ones((1 << 28,), jnp.float32))  # 1 GiB
    after = dm.memory_headroom()
    assert before is not None and after is not None
    assert 0.9 * (1 << 30) < before - after < 1.2 * (1 << 30)
    assert dm.memory_headroom(reserve=1 << 30) == pytest.approx(dm.memory_headroom() - (1 << 30), abs=64 << 20)
    del x
