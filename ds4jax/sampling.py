"""Token selection inside the decode program: greedy or ds4-style sampling.

ds4's defaults: temperature 1.0, top_k 0 (off), top_p 1.0 (off), min_p 0.05. Filters
apply in ds4's order: temperature, top-k, then min-p (relative to the most likely
token) and top-p (smallest prefix of the sorted distribution reaching p), then one
draw. Temperature 0 is greedy: the first index of the largest logit.
The values are traced scalars; which of three samplers runs (greedy, a plain draw, a draw
after the sorted top-k/top-p filters) is static (``kind_of``), so a decode program holds no
conditional: an XLA:GPU conditional copies its predicate to the host every step, which
stops the host from queueing the next step's kernels ahead of the device.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ds4jax.errors import DS4Error


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.05
    seed: int = 0

    def validate(self) -> SamplingParams:
        if not (0.0 <= self.temperature <= 100.0):
            raise DS4Error(f"--temp must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise DS4Error(f"--top_k must be >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise DS4Error(f"--top_p must be in (0, 1], got {self.top_p}")
        if not (0.0 <= self.min_p <= 1.0):
            raise DS4Error(f"--min_p must be in [0, 1], got {self.min_p}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def arrays(self):
        """The traced parameters of the decode program, as host scalars (``kind_of`` reads
        them without a device round trip)."""
        return (
            np.float32(self.temperature),
            np.int32(self.top_k),
            np.float32(self.top_p),
            np.float32(self.min_p),
        )


KINDS = ("greedy", "draw", "filtered")


def kind_of(params) -> str:
    """The sampler ``params`` (as from ``SamplingParams.arrays``) need: greedy at temperature 0,
    the sorted filters only when top-k or top-p is on."""
    temperature, top_k, top_p, _ = (np.asarray(p) for p in params)
    if temperature <= 0.0:
        return "greedy"
    return "filtered" if top_k > 0 or top_p < 1.0 else "draw"


def sample(logits: jax.Array, params, key: jax.Array, kind: str) -> jax.Array:
    """One token id (int32) from logits [V] with params = (temperature, top_k, top_p, min_p),
    by the static sampler ``kind`` (``kind_of(params)``)."""
    if kind not in KINDS:
        raise ValueError(f"sampler kind {kind!r} is not one of {KINDS}")
    temperature, top_k, top_p, min_p = params
    if kind == "greedy":
        return jnp.argmax(logits).astype(jnp.int32)
    lg = logits / jnp.maximum(temperature, 1e-6)
    m = jnp.max(lg)
    keep = (lg >= m) | (jnp.exp(lg - m) >= min_p)  # min-p relative to the top token, which stays
    if kind == "filtered":
        order = jnp.argsort(-lg, stable=True)
        s = lg[order]
        rank_ok = jnp.where(top_k > 0, jnp.arange(s.shape[0]) < top_k, True)
        p = jnp.where(rank_ok, jnp.exp(s - m), 0.0)
        p = p / jnp.sum(p)
        cum_before = jnp.cumsum(p) - p
        ok = rank_ok & (cum_before < top_p)  # keep until the prefix reaches top_p
        keep = keep & jnp.zeros_like(keep).at[order].set(ok)
    masked = jnp.where(keep, lg, -jnp.inf)
    return jax.random.categorical(key, masked).astype(jnp.int32)
