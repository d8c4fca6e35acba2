"""XLA runtime options the engine runs best with, put into ``XLA_FLAGS`` before JAX starts its
GPU client (XLA reads them once, when the client is created; later changes do nothing).

``--xla_gpu_command_buffer_update_mode=SKIP_TEMP``: each call of a compiled program gets a
fresh temporary buffer, and when its address differs from the last call's, XLA patches every
CUDA-graph node that uses it (nearly all of a decode step's ~4,800 kernels). A loop that reads
each call's tokens through a small copy (``engine.peek``) between calls moves that address every
call: 8 layers on an H200 ran 4.80 ms a token that way against 2.70 without the copy, and 2.68
with this option, which keeps the temporary buffer at one virtual address (session 15,
speed-bench/KERNELS.md). XLA then uses its VMM allocator instead of BFC.

``--xla_gpu_command_buffer_scheduling_mode=CONCURRENT``: the CUDA graph of a program gets the
dependencies of its buffers, so kernels that do not depend on each other run side by side (the
default, LHS, keeps a compute-only program in one serial chain). A decode step is ~2,000 small,
mostly latency-bound kernels: all 43 full-size layers ran 8.876 against 9.921 ms a token on an
H200, with the same state and tokens bit for bit (session 31, speed-bench/KERNELS.md). Buffer
assignment then reuses less, so temporary memory grows.

The MTP speculative step (``speculative.mtp_step``, a ``lax.switch`` that XLA records as a
conditional node of the step's one CUDA graph) gains from it too: all 43 layers on an H200,
experts as nibbles, 9.07 against 10.43 ms a step that drafts nothing and 11.59 against 13.35 one
that verifies, the same state bit for bit (session 42). Session 41 had measured the opposite
(``LHS`` faster, the GPU idle inside the step's graph) on an older form of the step whose
branches returned the committed-token count as constants (a constant output can become a memset
thunk, which XLA's command-buffer pass leaves out of the graph); the count is now read off the
state after the switch.

The MTP step keeps its loop and switch in the graph as conditional nodes. Out of it
(``xla_gpu_enable_command_buffer`` without ``WHILE`` and ``CONDITIONAL``) the host reads the
predicate and the branch index every step and waits in the call: the bench verifying every step
ran 83.7-86.6 tokens/s that way against 92.1-94.7 (H200, session 51). The price of the conditional
nodes: once such a graph has run, the plain step's graph in the same process runs ~0.5 ms slower
(7.78 against 8.24 ms at 43 layers), which a process generating by MTP speculation never runs.

Not set: ``--xla_gpu_enable_pdl`` (programmatic dependent launch): 8.814 against 8.825 ms a token at
43 layers, within the rounds' spread (H200, session 32).
"""

from __future__ import annotations

import importlib.metadata
import os

UPDATE_MODE = "xla_gpu_command_buffer_update_mode"
SCHEDULING_MODE = "xla_gpu_command_buffer_scheduling_mode"
OPTIONS = {UPDATE_MODE: "SKIP_TEMP", SCHEDULING_MODE: "CONCURRENT"}
FLAGS = tuple(f"--{name}={value}" for name, value in OPTIONS.items())
# JAX's share of the GPU's memory (its default: 0.75). The engine is the GPU's one user, and the
# routed experts as nibbles (``--expert_layout``, 4.6 % faster at 43 layers on an H200) take what
# is free: at 0.95 an H200 holds the q2 model with all but a few gate/up tensors repacked (0.97: all,
# with compiles and decode running, session 33).
MEM_FRACTION = "0.95"
MIN_JAXLIB = (0, 11)  # the first jaxlib whose XLA knows them (an unknown flag aborts XLA)


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split(".")[:3]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _knows_options(jaxlib_version: str | None) -> bool:
    """Whether the jaxlib (installed, or of this version) knows the options (``MIN_JAXLIB``)."""
    if jaxlib_version is None:
        try:
            jaxlib_version = importlib.metadata.version("jaxlib")
        except importlib.metadata.PackageNotFoundError:
            return False
    return _version(jaxlib_version) >= MIN_JAXLIB


def configure(environ=os.environ, jaxlib_version: str | None = None) -> bool:
    """Add ``FLAGS`` to ``XLA_FLAGS`` where they apply: a GPU may be used (``JAX_PLATFORMS``
    unset or naming one), the installed jaxlib knows them, and the user has not set that option
    (each on its own); there also ``XLA_PYTHON_CLIENT_MEM_FRACTION`` (``MEM_FRACTION``) unless set.
    Returns whether it added any flag. Call before the first JAX computation."""
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms and not any(p in platforms for p in ("cuda", "gpu", "rocm")):
        return False  # CPU only: nothing to change (and the compile cache keys stay as they are)
    environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", MEM_FRACTION)
    if not _knows_options(jaxlib_version):
        return False
    current = environ.get("XLA_FLAGS", "")
    new = [flag for name, flag in zip(OPTIONS, FLAGS) if name not in current]  # the user's choice stands
    if not new:
        return False
    environ["XLA_FLAGS"] = " ".join(filter(None, [current, *new]))
    return True
