"""A cap on the registers a thread of named Pallas-Triton kernels may use (Triton's ``maxnreg``).

Pallas's ``CompilerParams`` pass ``num_warps`` and ``num_stages`` only. Triton takes the cap as the
module attribute ``ttg.maxnreg``, which its lowering to PTX turns into ``.maxnreg``. ``install``
wraps Pallas's lowering so a kernel named in ``MAXNREG`` gets that attribute; the module goes to
XLA as before.

Why: fewer registers a thread let more programs share an SM. The Q2_K expert down (``experts_10``)
takes 72 registers, which fits 7 programs of 4 warps on an SM. Capped at 64 it fits 8, at the cost
of 8 spill instructions (none in a loop: the program is unrolled) and 992 against 952
instructions. Those numbers are from pip Triton 3.6 with the attribute in its Triton IR
(``speed-bench/sass.py experts --qtype Q2_K --out 4096 --k 2048 --maxnreg 64``, session 42).
Whether XLA's bundled Triton honours the attribute, and whether the cap pays, are for the GPU. Off
by default (an empty ``MAXNREG``).
"""

from __future__ import annotations

import functools

MAXNREG = ""  # "name:registers" items joined by '+', e.g. "experts_10:64" (the name pallas_call(name=) gives)


def caps(spec: str) -> dict[str, int]:
    """``MAXNREG``'s items as {kernel name: registers a thread}."""
    out: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in spec.split("+"))):
        name, sep, regs = item.rpartition(":")
        if not sep or not name or not regs.isdigit() or not 24 <= int(regs) <= 255:
            raise ValueError(f"MAXNREG item {item!r}: want name:registers with 24..255 registers")
        out[name] = int(regs)
    return out


def _capped(lower):
    @functools.wraps(lower)
    def lower_capped(*args, **kwargs):
        res = lower(*args, **kwargs)
        wanted = caps(MAXNREG)
        if wanted:
            from jax._src.lib.mlir import ir

            op = res.module.operation
            with res.module.context:
                cap = wanted.get(ir.StringAttr(op.attributes["sym_name"]).value)
                if cap:
                    op.attributes["ttg.maxnreg"] = ir.IntegerAttr.get(ir.IntegerType.get_signless(32), cap)
        return res

    lower_capped.ds4jax_capped = True
    return lower_capped


def install() -> None:
    """Wrap Pallas's Triton lowering once (a pass-through while ``MAXNREG`` is empty)."""
    from jax._src.pallas.triton import lowering

    lower = getattr(lowering, "lower_jaxpr_to_triton_module", None)  # a JAX internal: absent, no caps
    if lower is not None and not getattr(lower, "ds4jax_capped", False):
        lowering.lower_jaxpr_to_triton_module = _capped(lower)
