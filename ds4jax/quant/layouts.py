"""Load-time layouts: GGUF tensors repacked into planes that decode faster on the GPU.

A layout keeps a tensor's integer weights and scales, so every result keeps its bits; only the
bytes and the instructions to decode them change. Its ``QTensor.qtype`` is an id outside
GGML's type ids.

* ``IQ2_NIB`` (from IQ2_XXS): every weight a nibble c + 4·negative, c = 0, 1, 2 for the grid
  magnitudes 8, 25, 43 (8 nibbles a u32 word, element l of a group of 8 at bits 4l), and the 8
  sub-block scales 2·ls + 1 as bytes. 4.31 bits a weight against 2.06 (138 against 66 bytes a
  256-weight super-block); the expert kernel decodes a word of 4 weights with one PTX ``prmt``
  instead of table gathers and sign-parity arithmetic (``pallas_kernels/experts.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ds4jax.device_memory import memory_headroom
from ds4jax.errors import DS4Error
from ds4jax.quant.formats import QType
from ds4jax.quant.planes import QTensor, tree_nbytes
from ds4jax.quant.tables import IQ2XXS_GRID_I8

IQ2_NIB = 0x1000 | int(QType.IQ2_XXS)
# --expert_layout: auto (IQ2_XXS gate/up as IQ2_NIB on a GPU, as far as its memory allows; as stored
# elsewhere), gguf (as stored), nib (IQ2_NIB as far as the memory allows)
EXPERT_LAYOUTS = ("auto", "gguf", "nib")
_U32 = jnp.uint32


def iq2_xxs_ints(p: dict) -> tuple[jax.Array, jax.Array]:
    """IQ2_XXS planes {grid, aux} [..., nb, ...] → (signed magnitudes int8 [..., nb, 8, 32],
    sub-block scales 2·ls + 1 int32 [..., nb, 8]); the 8th sign of a group is the parity of
    its 7 stored ones."""
    aux = p["aux"]  # [..., nb, 8] u32: 4 × 7 sign bits, 4-bit scale
    lead = aux.shape[:-1]
    ls = (aux >> 28).astype(jnp.int32)
    s7 = (aux[..., None] >> jnp.array([0, 7, 14, 21], _U32)) & 127  # [..., nb, 8, 4]
    sbyte = s7 | ((jax.lax.population_count(s7) & 1) << 7)
    neg = ((sbyte[..., None] >> jnp.arange(8, dtype=_U32)) & 1) != 0  # [..., nb, 8, 4, 8]
    mag = jnp.asarray(IQ2XXS_GRID_I8)[p["grid"].astype(jnp.int32)].reshape(lead + (8, 4, 8))
    return jnp.where(neg, -mag, mag).reshape(lead + (8, 32)), 2 * ls + 1


def iq2_nib_ints(p: dict) -> tuple[jax.Array, jax.Array]:
    """IQ2_NIB planes {nib, sc} → the same integer view as ``iq2_xxs_ints``."""
    w = p["nib"]  # [..., nb, 32] u32
    lead = w.shape[:-1]
    nib = ((w[..., None] >> (4 * jnp.arange(8, dtype=_U32))) & 15).astype(jnp.int32)  # [..., nb, 32, 8]
    c = nib & 3
    mag = 8 + 17 * c + (c == 2)
    return jnp.where(nib >= 4, -mag, mag).astype(jnp.int8).reshape(lead + (8, 32)), p["sc"].astype(jnp.int32)


def iq2_nib_planes(p: dict) -> dict:
    """IQ2_XXS planes {grid, aux, d} → IQ2_NIB planes {nib, sc, d}."""
    vals, sc = iq2_xxs_ints(p)
    mag = jnp.abs(vals.astype(jnp.int32))
    nib = ((mag - 8) // 17 + 4 * (vals < 0)).astype(_U32)  # 8, 25, 43 -> 0, 1, 2
    nib = nib.reshape(*nib.shape[:-2], 32, 8)  # groups of 8 elements, in element order
    word = jnp.sum(nib << (4 * jnp.arange(8, dtype=_U32)), axis=-1, dtype=_U32)
    return {"nib": word, "sc": sc.astype(jnp.uint8), "d": p["d"]}


def dequantize_iq2(vals: jax.Array, sc: jax.Array, d: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """f32 weights of IQ2_XXS or IQ2_NIB from their integer view (``iq2_xxs_ints``,
    ``iq2_nib_ints``) and d: d · (0.5 + ls) · 0.25 · magnitude, then the sign (ggml's order;
    0.5 · (2 ls + 1) = 0.5 + ls exactly)."""
    db = d.astype(jnp.float32)[..., None] * (sc.astype(jnp.float32) * 0.5) * 0.25  # [..., nb, 8]
    mag = db[..., None] * jnp.abs(vals.astype(jnp.float32))
    return jnp.where(vals < 0, -mag, mag).reshape(shape)


# Experts this many at a time: the conversion's integer temporaries take ~5 bytes a weight (10.7 GB
# for one of the full model's 256-expert tensors at once, which an H200 with the whole model as
# nibbles could not hold: session 32), ~0.7 GB for 16 experts of 2048 x 4096.
_EXPERTS_A_STEP = 16


def _iq2_nib_planes_stepwise(p: dict) -> dict:
    """``iq2_nib_planes`` of an expert tensor's planes [E, ...] a few experts at a time: the same planes."""
    return jax.lax.map(iq2_nib_planes, p, batch_size=min(_EXPERTS_A_STEP, p["aux"].shape[0]))


_to_nib = jax.jit(_iq2_nib_planes_stepwise)
_to_nib_donating = jax.jit(_iq2_nib_planes_stepwise, donate_argnums=0)


_GATE_UP = ("ffn_gate_exps", "ffn_up_exps")


def resolve_layout(layout: str) -> str:
    """``layout`` checked, ``auto`` made concrete: nibbles where the expert kernels run (a GPU: the
    whole q2 model decodes 4.6 % faster that way on an H200, session 33), as stored elsewhere (the
    CPU runs the jnp reference, which only reads more bytes from nibbles)."""
    if layout not in EXPERT_LAYOUTS:
        raise DS4Error(f"--expert_layout must be one of {', '.join(EXPERT_LAYOUTS)}, got {layout!r}")
    if layout == "auto":
        return "nib" if jax.default_backend() == "gpu" else "gguf"
    return layout


def _convert(qt: QTensor, donate: bool) -> QTensor:
    """One IQ2_XXS tensor as IQ2_NIB, waited for: dispatch is asynchronous, and each call's output
    is allocated when it is queued while a donated input is freed only when its call has run, so
    a loop that does not wait holds every new copy beside the old ones."""
    convert = _to_nib_donating if donate else _to_nib
    return QTensor(IQ2_NIB, qt.shape, jax.block_until_ready(convert(dict(qt.planes))))


def _nib_nbytes(qt: QTensor) -> int:
    """Bytes the IQ2_NIB planes of ``qt`` take."""
    return tree_nbytes(jax.eval_shape(iq2_nib_planes, dict(qt.planes)))


class Repacker:
    """The routed gate/up IQ2_XXS tensors converted to ``layout`` as the weights come onto the
    device, one tensor at a time (``load_weights``, ``random_weights``): each arrives, is converted
    with its planes given up, and the next tensor's planes, of the same sizes, reuse their memory.
    Converting after the whole model is on the device cannot do that: XLA's VMM allocator (which
    the engine's CUDA-graph option selects) keeps a freed buffer for an allocation of the same size,
    and the conversion's outputs have other sizes, so an H200 holding the q2 model ran out of
    memory at 145 GB with every freed IQ2_XXS plane still held (session 33).

    ``remaining``: bytes of all tensors still to come (this one included); a tensor is converted
    while the device's headroom, less ``keep_free`` and what is still to come, holds its new
    planes; the rest stay IQ2_XXS (each layer's kernels follow its own tensors' type, so a mixed
    model gives the same bits). No limit where the device does not say (the CPU)."""

    def __init__(self, layout: str, remaining: int, keep_free: int = 0):
        self.layout, self.remaining, self.keep_free = resolve_layout(layout), remaining, keep_free

    def keep(self, qt: QTensor) -> QTensor:
        """``qt`` (on the host or the device) on the device as it is (the MTP block's tensors)."""
        self.remaining -= qt.nbytes
        return jax.device_put(qt)

    def __call__(self, name: str, qt: QTensor) -> QTensor:
        """``qt`` (on the host or the device; ``name`` its short name, ``weights.short_name``) on
        the device, converted where it is a routed gate/up IQ2_XXS tensor and fits."""
        qt = self.keep(qt)
        if self.layout == "gguf" or name not in _GATE_UP or qt.qtype != QType.IQ2_XXS:
            return qt
        head = memory_headroom(self.keep_free + max(self.remaining, 0))
        return qt if head is not None and _nib_nbytes(qt) > head else _convert(qt, donate=True)


def with_expert_layout(weights: dict, layout: str, donate: bool = False, budget: int | None = None) -> dict:
    """The weights pytree with its routed experts' gate/up tensors in ``layout`` (``"gguf"``:
    unchanged; ``"nib"``: IQ2_XXS ones as IQ2_NIB, on their device, one tensor at a time; ``"auto"``:
    ``resolve_layout``), for weights already loaded (a model that fills the device: ``Repacker``
    while loading instead).
    ``donate``: the IQ2_XXS planes are given up as each tensor is converted, so ``weights`` must
    not be used after. ``budget``: bytes the conversion may add (None: no limit); tensors are
    converted in layer order while they fit and the rest stay IQ2_XXS. The MTP block's experts
    stay (Q4_K in the published files)."""
    if resolve_layout(layout) == "gguf":
        return weights
    left = budget
    layers = []
    for w in weights["layers"]:
        w = dict(w)
        for name in _GATE_UP:
            qt = w.get(name)
            if qt is None or qt.qtype != QType.IQ2_XXS:
                continue
            if left is not None:  # what it adds (donated: the IQ2_XXS planes are freed)
                extra = _nib_nbytes(qt) - (qt.nbytes if donate else 0)
                if extra > left:
                    continue
                left -= extra
            w[name] = _convert(qt, donate)
        layers.append(w)
    return {**weights, "layers": type(weights["layers"])(layers)}


def expert_layout_counts(weights: dict) -> tuple[int, int]:
    """(routed gate/up expert tensors as IQ2_NIB, those as IQ2_XXS or IQ2_NIB)."""
    kinds = [w[n].qtype for w in weights["layers"] for n in ("ffn_gate_exps", "ffn_up_exps") if n in w]
    return sum(q == IQ2_NIB for q in kinds), sum(q in (IQ2_NIB, QType.IQ2_XXS) for q in kinds)
