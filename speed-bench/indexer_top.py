"""The indexer's top-k launch (``pallas_kernels.indexer_top``) against XLA's forms, alone.

For each table size n (the compressed rows a ratio-4 layer allocates: context / 4 plus 17), visible count
and token count: the launch's own duration (the profiler), XLA's ``lax.top_k`` of the masked scores
(a sort of the whole table) and, where it is the engine's pick (T·n² ≤ ``RANK_TOP_K_MAX``), XLA's
rank fusion; every form's indices checked equal first. Rows go to ``$OUT/indexer_top.csv``.

    python speed-bench/indexer_top.py [--n 1041,8209] [--visible 512,2048,8192] [--tokens 1,2]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import devtime  # speed-bench/devtime.py, beside this script

from ds4jax.model import indexer
from pallas_kernels import indexer_top

FORMS = ("kernel", "kernel_8w", "kernel_64c", "sort", "rank")


def _forms(T: int, n: int, k: int, gpu: bool) -> dict:
    """name -> fn(i, scores, n_visible) for ``devtime.per_call``: the launch, XLA's sort and (where
    the engine would pick it) XLA's rank fusion, the last two on the masked scores."""

    def masked(s, nvis):
        return jnp.where(jnp.arange(n)[None, :] < nvis[:, None], s, -jnp.inf)

    forms = {
        "kernel": lambda i, s, nvis: indexer_top.top(s, nvis + 0 * i, k, interpret=not gpu),
        "kernel_8w": lambda i, s, nvis: indexer_top.top(s, nvis + 0 * i, k, interpret=not gpu, warps=8),
        "kernel_64c": lambda i, s, nvis: indexer_top.top(s, nvis + 0 * i, k, interpret=not gpu, cols=64),
        "sort": lambda i, s, nvis: jax.lax.top_k(masked(s, nvis + 0 * i), k)[1],
    }
    if T * n * n <= indexer.RANK_TOP_K_MAX:
        forms["rank"] = lambda i, s, nvis: indexer.top_indices(masked(s, nvis + 0 * i), k)
    return forms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="1041,8209", help="table rows (comma-separated)")
    ap.add_argument("--visible", default="512,2048,8192", help="visible rows (those ≤ n)")
    ap.add_argument("--tokens", default="1,2")
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--steps", type=int, default=200)
    a = ap.parse_args()
    gpu = jax.default_backend() == "gpu"
    card = jax.devices()[0].device_kind
    rows = []
    rng = np.random.default_rng(0)
    for n in (int(x) for x in a.n.split(",")):
        for nv in (int(x) for x in a.visible.split(",")):
            if nv > n:
                continue
            for T in (int(x) for x in a.tokens.split(",")):
                s = jnp.asarray(rng.standard_normal((T, n)).astype(np.float32))
                nvis = jnp.full((T,), nv, jnp.int32)
                forms = _forms(T, n, min(a.k, n), gpu)
                want = np.asarray(jax.jit(forms["sort"])(0, s, nvis))
                us = {}
                for name, fn in forms.items():
                    got = np.asarray(jax.jit(fn)(0, s, nvis))
                    if not np.array_equal(got, want):
                        raise SystemExit(f"{name} n={n} visible={nv} T={T}: indices differ from lax.top_k")
                    only = "indexer_top" if name.startswith("kernel") and gpu else None
                    us[name] = devtime.per_call(fn, a.steps, s, nvis, only=only)[0] * 1e6
                line = "  ".join(f"{f} {v:7.2f} us" for f, v in us.items())
                print(f"{card}: n={n:5d} visible={nv:5d} T={T}  {line}", flush=True)
                rows.append([card, n, nv, T, min(a.k, n)] + [f"{us.get(f, float('nan')):.2f}" for f in FORMS])
    out = os.environ.get("OUT", ".")
    path = os.path.join(out, "indexer_top.csv")
    new = not os.path.exists(path)
    with open(path, "a") as f:
        if new:
            f.write("card,n,visible,n_tok,k," + ",".join(f + "_us" for f in FORMS) + "\n")
        f.writelines(",".join(map(str, r)) + "\n" for r in rows)


if __name__ == "__main__":
    main()
