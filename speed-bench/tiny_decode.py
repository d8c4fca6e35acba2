"""Prefill and decode speed of the plain (XLA, no Pallas) engine on a model.

    python speed-bench/tiny_decode.py [--model M.gguf] [--prompt_len 256] [--n 128]

Prints one CSV line: device, model, ctx, chunk, prompt tokens, prefill tokens/s,
decode tokens/s, weight bytes per decode step and the GB/s that implies. Decode is
timed through Engine.generate, i.e. one compiled program per token plus the Python
dispatch of each call (65-145 us on an H200), so small models measure dispatch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

from ds4jax.default_model import base_path_or_default
from ds4jax.engine import Engine
from ds4jax.model_file import open_model
from ds4jax.sampling import SamplingParams
from ds4jax.summary import decode_bytes_per_token


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--prompt_len", type=int, default=256)
    ap.add_argument("--n", type=int, default=128)
    a = ap.parse_args()
    path = base_path_or_default(a.model)
    mf = open_model(path)
    eng = Engine(mf, ctx=a.ctx, chunk=a.chunk)
    prompt = np.random.default_rng(0).integers(0, mf.config.n_vocab, a.prompt_len).tolist()
    greedy = SamplingParams(temperature=0.0)
    eng.generate(prompt[: a.chunk], 2, greedy)  # compile both programs
    g = eng.generate(prompt, a.n, greedy)
    dev = jax.devices()[0]
    wb = decode_bytes_per_token(mf)
    step_s = g.decode_s / max(len(g.tokens) - 1, 1)
    print("device,model,ctx,chunk,prompt,prefill_tps,decode_tps,weight_bytes_per_step,decode_gbps,compile_s")
    print(
        f"{dev.device_kind.replace(',', ' ')},{os.path.basename(path)},{a.ctx},{a.chunk},{a.prompt_len},"
        f"{g.prefill_tps:.1f},{g.decode_tps:.1f},{wb},{wb / step_s / 1e9:.3f},{sum(eng.compile_s.values()):.1f}"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    t0 = time.time()
    main()
