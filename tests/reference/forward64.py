"""Float64 NumPy reference of the DeepSeek V4 Flash forward pass (ds4's CPU decode path).

Written from MODEL.md (§0, §1, §3.6-3.8, §4, §5; section numbers in the comments) with
antirez/ds4 ``ds4.c`` (commit 8d57664) as the tie-breaker where the text is terse. It shares
no code with ``ds4jax.model``: only the GGUF reader (``open_model``) and the block decoders
(``ds4jax.quant``) are reused. Every width comes from the ``ModelConfig``.

Usage::

    ref = RefModel(open_model(base_path), act_quant=True)
    st = ref.new_state()
    logits = ref.step(st, token_id)     # float64 [n_vocab], token at position st.n_tokens

Numerics: all arithmetic is float64. The model's own QAT simulations are applied exactly
(FP8-E4M3 KV rows, Hadamard + FP4-E2M1 indexer rows, f16 rounding of every stored cache row,
§3.7/§3.8). With ``act_quant=True`` ds4's CPU activation quantization is emulated (§3.6):
int8 per-32 blocks before every Q8_0 matmul (integer block dots, then block scales) and Q8_K
per-256 blocks before the routed experts; F16-weight matmuls are plain float64.

Compressor frontier convention (§5.2): after a row is emitted the rows that no longer belong
to the frontier are reset to (kv 0, score -1e30), i.e. the state always equals the canonical
streaming state that ds4's ``compressor_finish_prefill_state_cpu`` produces. (ds4's decode
path leaves stale copies there; they are never read.) ``frontier_rows`` lists the live rows.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np

from ds4jax.quant import decode_numpy, pack

NEG_INF = -1e30  # ds4's "-inf" sentinel for empty score rows (§1)
F16, Q8_0 = 1, 8  # GGML type ids used here (§2.1)


# ----------------------------------------------------------------------------------------------
# Numeric primitives
# ----------------------------------------------------------------------------------------------


def f16_round(x: np.ndarray) -> np.ndarray:
    """§3.8 f16 cache rounding: float64 -> nearest binary16 (RNE) -> float64."""
    return np.asarray(x, dtype=np.float64).astype(np.float16).astype(np.float64)


def _pow2_ceil_exponent(r: np.ndarray) -> np.ndarray:
    """Smallest integer e with 2**e >= r (r > 0): ceil(log2 r), computed exactly via frexp."""
    mant, ex = np.frexp(r)  # r = mant * 2**ex, mant in [0.5, 1)
    return np.where(mant == 0.5, ex - 1, ex)


def e4m3_round(v: np.ndarray) -> np.ndarray:
    """§3.7 nearest E4M3FN value of v (|v| <= 448 after clamping), ties to the even mantissa.

    Normal values are (8+m)*2^(e-3) (e >= -6), subnormals m*2^-9: round |v| on that quantum
    grid with round-half-even (the even integer is the even mantissa/table index, as in ds4's
    ``dsv4_e4m3fn_dequant_cpu``).
    """
    v = np.clip(np.asarray(v, dtype=np.float64), -448.0, 448.0)
    a = np.abs(v)
    _, ex = np.frexp(np.where(a > 0, a, 1.0))  # a in [2^(ex-1), 2^ex)
    e = np.maximum(ex - 1, -6)  # subnormals share the 2^-6 binade quantum
    quantum = np.ldexp(1.0, e - 3)
    return np.sign(v) * np.minimum(np.rint(a / quantum) * quantum, 448.0)


def fp8_kv_sim(row: np.ndarray, n_nope: int, block: int) -> np.ndarray:
    """§3.7 FP8 KV simulation on dims [0, n_nope) in blocks of ``block``; tail left as is."""
    out = np.array(row, dtype=np.float64)
    x = out[:n_nope].reshape(-1, block)
    amax = np.maximum(np.abs(x).max(axis=1), 1e-4)
    scale = np.ldexp(1.0, _pow2_ceil_exponent(amax / 448.0))[:, None]  # UE8M0 block scale
    out[:n_nope] = (e4m3_round(np.clip(x / scale, -448.0, 448.0)) * scale).reshape(-1)
    return out


E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def e2m1_round(v: np.ndarray) -> np.ndarray:
    """§3.7 nearest FP4-E2M1 value of v (|v| <= 6), ties to the even table index.

    Values are m*0.5 below 2 and (2+m)*2^(e-1) above: round on the binade quantum with
    round-half-even (0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4).
    """
    v = np.clip(np.asarray(v, dtype=np.float64), -6.0, 6.0)
    a = np.abs(v)
    _, ex = np.frexp(np.where(a > 0, a, 1.0))
    quantum = np.ldexp(1.0, np.maximum(ex - 1, 0) - 1)  # 0.5 below 2, then 1, 2
    return np.sign(v) * np.minimum(np.rint(a / quantum) * quantum, 6.0)


def fp4_sim(x: np.ndarray, block: int) -> np.ndarray:
    """§3.7 FP4 activation simulation: per-``block`` power-of-two scale, E2M1 round trip."""
    xb = np.asarray(x, dtype=np.float64).reshape(-1, block)
    amax = np.maximum(np.abs(xb).max(axis=1), 7.052966104933725e-38)
    scale = np.ldexp(1.0, _pow2_ceil_exponent(amax / 6.0))[:, None]
    return (e2m1_round(np.clip(xb / scale, -6.0, 6.0)) * scale).reshape(np.shape(x))


def hadamard(x: np.ndarray) -> np.ndarray:
    """§3.7 Walsh-Hadamard (Sylvester order: butterflies of stride 1, 2, ...) times 1/sqrt(n)."""
    y = np.array(x, dtype=np.float64)
    n = y.shape[-1]
    stride = 1
    while stride < n:
        z = y.reshape(-1, n // (2 * stride), 2, stride)
        a, b = z[:, :, 0, :].copy(), z[:, :, 1, :].copy()
        z[:, :, 0, :], z[:, :, 1, :] = a + b, a - b
        y = z.reshape(y.shape)
        stride *= 2
    return y / math.sqrt(n)


def indexer_qat(rows: np.ndarray, block: int) -> np.ndarray:
    """§3.7 indexer QAT: Hadamard then FP4 round trip, per row of the last dim."""
    return fp4_sim(hadamard(rows), block)


def q8_0_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """§3.6 Q8_0 activation quantization: per 32 values, d = amax/127, q = rint(x * (1/d)).

    The codes are decided in float32 exactly as ds4 computes them (f32 activation, f32 d,
    f32 reciprocal, one f32 product, round half to even): activations built from few-bit
    values (FP8/f16 rows times a softmax weight) often land on exact .5 ties, where a
    float64 product would round the other way from ds4 every time."""
    xb = np.asarray(x, dtype=np.float32).reshape(-1, 32)
    d = np.abs(xb).max(axis=1) / np.float32(127.0)
    inv = np.divide(np.float32(1.0), d, out=np.zeros_like(d), where=d != 0)
    q = np.clip(np.rint(xb * inv[:, None]), -128, 127)
    return q.astype(np.float64), d.astype(np.float64)


def q8_k_roundtrip(x: np.ndarray) -> np.ndarray:
    """§3.6 Q8_K: per 256, m = value with the largest |x| (first on ties), iscale = -127/m,
    q = clamp(rint(iscale*x)), d = 1/iscale; returns q*d (the expert dots are d_x * sum w*q).
    Codes and d are computed in float32 as ds4 does (see ``q8_0_quantize``)."""
    xb = np.asarray(x, dtype=np.float32).reshape(-1, 256)
    m = xb[np.arange(xb.shape[0]), np.abs(xb).argmax(axis=1)]  # argmax: first on ties
    out = np.zeros(xb.shape)
    nz = m != 0
    iscale = np.float32(-127.0) / m[nz]
    q = np.clip(np.rint(iscale[:, None] * xb[nz]), -128, 127)
    out[nz] = q.astype(np.float64) * (np.float32(1.0) / iscale).astype(np.float64)[:, None]
    return out.reshape(np.shape(x))


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------


class Q8Matrix:
    """A Q8_0 weight W[out, in] kept as its int8 quants and f16 block scales (§3.2).

    ``matvec(x, act_quant)``: with act_quant, x is Q8_0-quantized (§3.6) and each output is
    sum_b d_w[b] * d_x[b] * (integer block dot); otherwise the same block dots on float x.
    """

    def __init__(self, t):
        shape = t.logical_shape
        p = pack(t.raw, t.type_id, shape).planes
        out, n_in = shape
        nb = n_in // 32
        # [nb, out, 32]: one contiguous GEMV per block; the values are small integers (exact).
        self.qs = np.ascontiguousarray(p["qs"].reshape(out, nb, 32).transpose(1, 0, 2)).astype(np.float64)
        self.d = np.ascontiguousarray(p["d"].astype(np.float64).T)  # [nb, out]
        self.shape = (out, n_in)

    def matvec(self, x: np.ndarray, act_quant: bool) -> np.ndarray:
        if act_quant:
            xq, dx = q8_0_quantize(x)
        else:
            xq, dx = np.asarray(x, dtype=np.float64).reshape(-1, 32), np.ones(self.qs.shape[0])
        dots = np.matmul(self.qs, xq[:, :, None])[..., 0]  # [nb, out] block dots
        return np.einsum("bo,b,bo->o", self.d, dx, dots)

    def row_slice(self, r0: int, r1: int) -> Q8Matrix:
        """Rows [r0, r1) as a Q8Matrix (views of the same quants and scales)."""
        sub = Q8Matrix.__new__(Q8Matrix)
        sub.qs, sub.d, sub.shape = self.qs[:, r0:r1], self.d[:, r0:r1], (r1 - r0, self.shape[1])
        return sub

    def dequantized(self) -> np.ndarray:
        return (self.qs * self.d[..., None]).transpose(1, 0, 2).reshape(self.shape)


def _plain(t) -> np.ndarray:
    """F32/F16/I32 tensor in its logical (reversed-ne) shape; floats as float64."""
    shape = t.logical_shape
    a = decode_numpy(t.raw.reshape(*shape[:-1], -1), t.type_id, shape[-1])
    return a if a.dtype == np.int32 else a.astype(np.float64)


def _dequant(t) -> np.ndarray:
    """Any supported tensor dequantized to float64 in its logical shape."""
    shape = t.logical_shape
    return decode_numpy(t.raw.reshape(*shape[:-1], -1), t.type_id, shape[-1]).astype(np.float64)


# ----------------------------------------------------------------------------------------------
# Small math helpers
# ----------------------------------------------------------------------------------------------


def rms_norm(x: np.ndarray, g: np.ndarray | None, eps: float) -> np.ndarray:
    """§4.3 x * (mean(x^2) + eps)^-1/2 (* g) over the last axis."""
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if g is None else y * g


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def silu(x):
    return x * sigmoid(x)


def softplus(x: np.ndarray) -> np.ndarray:
    """§4.11 ds4's softplus_stable: x > 20 -> x; x < -20 -> e^x; else log1p(e^x)."""
    mid = np.log1p(np.exp(np.clip(x, -20.0, 20.0)))
    return np.where(x > 20.0, x, np.where(x < -20.0, np.exp(np.minimum(x, 0.0)), mid))


def swiglu(g: np.ndarray, u: np.ndarray, clamp: float) -> np.ndarray:
    """§4.11 asymmetric clamp (gate <= c, up in [-c, c]) then silu(g)*u."""
    if clamp > 1e-6:
        g = np.minimum(g, clamp)
        u = np.clip(u, -clamp, clamp)
    return silu(g) * u


def top_k_stable(score: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, descending, ties to the lower index (ds4 topk_desc)."""
    return np.argsort(-score, kind="stable")[:k]


# ----------------------------------------------------------------------------------------------
# RoPE / YaRN (§4.6)
# ----------------------------------------------------------------------------------------------


def yarn_corr_dims(n_rot: int, orig_ctx: int, base: float, beta_fast: float, beta_slow: float) -> tuple[int, int]:
    """§4.6 YaRN correction range (lo, hi) in pair units: cd(b) = n_rot ln(orig/(2 pi b)) / (2 ln base)."""

    def cd(beta):
        return n_rot * math.log(orig_ctx / (2.0 * math.pi * beta)) / (2.0 * math.log(base))

    return max(0, math.floor(cd(beta_fast))), min(n_rot - 1, math.ceil(cd(beta_slow)))


def yarn_ramp(n_pairs: int, lo: int, hi: int) -> np.ndarray:
    """§4.6 r_k = 1 - clamp((k - lo) / max(0.001, hi - lo), 0, 1) (1 = extrapolated frequency)."""
    k = np.arange(n_pairs, dtype=np.float64)
    return 1.0 - np.clip((k - lo) / max(0.001, hi - lo), 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Rope:
    """One layer's RoPE parameters (§4.6): theta_k(p) = p * freq_k, blended by YaRN."""

    freq: np.ndarray  # base^(-2k/n_rot), k = 0..n_rot/2-1
    interp_scale: float  # 1/factor on compressed layers, else 1
    ramp: np.ndarray | None  # YaRN blend r_k, None = no YaRN

    @classmethod
    def for_layer(cls, cfg, layer: int) -> Rope:
        n_pairs = cfg.n_rot // 2
        compressed = cfg.ratio(layer) != 0
        base = cfg.compress_rope_freq_base if compressed and cfg.compress_rope_freq_base > 0 else cfg.rope_freq_base
        freq = base ** (-2.0 * np.arange(n_pairs) / cfg.n_rot)
        if not compressed:
            return cls(freq, 1.0, None)
        factor = cfg.rope_scale_factor
        scale = 1.0 / factor if factor > 0 else 1.0
        ramp = None
        if factor > 1.0:  # ds4: ext_factor = 1; its attn_factor cancels the YaRN magnitude
            lo, hi = yarn_corr_dims(cfg.n_rot, cfg.rope_orig_ctx, base, cfg.yarn_beta_fast, cfg.yarn_beta_slow)
            ramp = yarn_ramp(n_pairs, lo, hi)
        return cls(freq, scale, ramp)

    def angles(self, pos: int) -> np.ndarray:
        extrap = float(pos) * self.freq
        interp = self.interp_scale * extrap
        if self.ramp is None:
            return interp
        return interp * (1.0 - self.ramp) + extrap * self.ramp

    def apply(self, x: np.ndarray, pos: int, n_rot: int, inverse: bool = False) -> np.ndarray:
        """Rotate adjacent pairs (2k, 2k+1) of the last n_rot dims of x[..., hd] by +-theta(pos)."""
        th = self.angles(pos)
        c, s = np.cos(th), np.sin(th) * (-1.0 if inverse else 1.0)
        y = np.array(x, dtype=np.float64)
        tail = y[..., -n_rot:]
        x0, x1 = tail[..., 0::2].copy(), tail[..., 1::2].copy()
        tail[..., 0::2] = x0 * c - x1 * s
        tail[..., 1::2] = x0 * s + x1 * c
        return y


# ----------------------------------------------------------------------------------------------
# State (§5.1)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Compressor:
    """§4.7 / §5.1 frontier of one compressor: (coff*ratio) x (coff*head_dim) kv and score rows."""

    kv: np.ndarray
    score: np.ndarray

    @classmethod
    def empty(cls, ratio: int, coff: int, hd: int) -> Compressor:
        return cls(np.zeros((coff * ratio, coff * hd)), np.full((coff * ratio, coff * hd), NEG_INF))


@dataclasses.dataclass
class LayerState:
    ratio: int
    raw: np.ndarray  # [min(n, n_swa), head_dim]: f16-rounded KV rows, oldest first (§4.5 step 5)
    comp: np.ndarray  # [floor(n/ratio), head_dim]: compressed attention rows (f16-rounded)
    index: np.ndarray  # [floor(n/4), idx_head_dim]: indexer rows (ratio 4 only, f16-rounded)
    attn: Compressor | None  # attention compressor frontier (ratio != 0)
    idx: Compressor | None  # indexer compressor frontier (ratio 4)
    last_selected: np.ndarray | None = None  # compressed rows attended at the last step

    @property
    def n_raw(self) -> int:
        return self.raw.shape[0]

    @property
    def n_comp(self) -> int:
        return self.comp.shape[0]

    @property
    def n_index_comp(self) -> int:
        return self.index.shape[0]


@dataclasses.dataclass
class RefState:
    n_tokens: int
    layers: list[LayerState]
    tokens: list[int]
    # One entry per processed token: {layer: (visible compressed rows, rows attended)} for the
    # indexer (ratio-4) layers.
    index_log: list[dict[int, tuple[int, int]]]
    # One entry per processed token: the routed expert ids of every layer (selection order).
    expert_log: list[list[np.ndarray]]


def frontier_rows(ratio: int, n_tokens: int) -> np.ndarray:
    """§5.2 live frontier rows after n tokens (the others hold kv 0 / score -1e30)."""
    rem = n_tokens % ratio
    if ratio == 4:
        prev = np.arange(4) if n_tokens >= 4 else np.arange(0)
        return np.concatenate([prev, 4 + np.arange(rem)]).astype(int)
    return np.arange(rem)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class _Layer:
    """Float64 weights of one block (F16/F32 dequantized, Q8_0 as Q8Matrix, experts lazily)."""

    def __init__(self, mf, L: int, mtp: bool = False):
        """Base layer L, or (mtp=True) the MTP block, which ds4 runs as layer 1 without
        compression or hash routing (SPECULATIVE.md §1.4)."""
        c = mf.config
        T = mf.mtp.tensors if mtp else mf.base.tensors
        p = "mtp.0." if mtp else f"blk.{L}."
        self.L = L
        self.tensors = {k: T[p + k] for k in ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")}
        self.hc_attn = (
            _plain(T[p + "hc_attn_fn.weight"]),
            _plain(T[p + "hc_attn_scale.weight"]),
            _plain(T[p + "hc_attn_base.weight"]),
        )
        self.hc_ffn = (
            _plain(T[p + "hc_ffn_fn.weight"]),
            _plain(T[p + "hc_ffn_scale.weight"]),
            _plain(T[p + "hc_ffn_base.weight"]),
        )
        self.attn_norm = _plain(T[p + "attn_norm.weight"])
        self.q_a = Q8Matrix(T[p + "attn_q_a.weight"])
        self.q_a_norm = _plain(T[p + "attn_q_a_norm.weight"])
        self.q_b = Q8Matrix(T[p + "attn_q_b.weight"])
        self.kv = Q8Matrix(T[p + "attn_kv.weight"])
        self.kv_norm = _plain(T[p + "attn_kv_a_norm.weight"])
        self.sinks = _plain(T[p + "attn_sinks.weight"])
        out_a = Q8Matrix(T[p + "attn_output_a.weight"])  # block-diagonal: one row block per group
        r = c.o_lora_rank
        self.out_a_groups = [out_a.row_slice(g * r, (g + 1) * r) for g in range(c.n_out_group)]
        self.out_b = Q8Matrix(T[p + "attn_output_b.weight"])
        self.ffn_norm = _plain(T[p + "ffn_norm.weight"])
        self.router = _plain(T[p + "ffn_gate_inp.weight"])
        self.router_bias = _plain(T[p + "exp_probs_b.bias"]) if p + "exp_probs_b.bias" in T else None
        self.sh_gate = Q8Matrix(T[p + "ffn_gate_shexp.weight"])
        self.sh_up = Q8Matrix(T[p + "ffn_up_shexp.weight"])
        self.sh_down = Q8Matrix(T[p + "ffn_down_shexp.weight"])
        self.tid2eid = _plain(T[p + "ffn_gate_tid2eid.weight"]) if c.is_hash_layer(L) and not mtp else None
        self.ratio = 0 if mtp else c.ratio(L)
        self.rope = Rope.for_layer(c, L)
        if self.ratio:
            self.cmp = {k: _plain(T[p + f"attn_compressor_{k}.weight"]) for k in ("ape", "kv", "gate", "norm")}
        if c.has_indexer(L) and not mtp:
            self.icmp = {k: _plain(T[p + f"indexer_compressor_{k}.weight"]) for k in ("ape", "kv", "gate", "norm")}
            self.idx_q_b = _plain(T[p + "indexer.attn_q_b.weight"])
            self.idx_proj = _plain(T[p + "indexer.proj.weight"])
        self._experts: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def expert(self, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Dequantized (gate [ff, embd], up [ff, embd], down [embd, ff]) of routed expert e."""
        if e not in self._experts:
            mats = []
            for k in ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight"):
                t = self.tensors[k]
                n_exp, out, n_in = t.logical_shape
                rows = t.raw.reshape(n_exp, out, -1)[e]
                mats.append(decode_numpy(rows, t.type_id, n_in).astype(np.float64))
            self._experts[e] = tuple(mats)
        return self._experts[e]


class RefModel:
    """The reference model: ``new_state()``, then ``step(state, token)`` per token (§4.14)."""

    def __init__(self, mf, act_quant: bool = True):
        self._mf = mf
        self.cfg = c = mf.config
        self.act_quant = act_quant
        T = mf.base.tensors
        te = T["token_embd.weight"]
        self.embd_f16 = np.ascontiguousarray(te.raw).view("<f2").reshape(c.n_vocab, c.n_embd)
        self.layers = [_Layer(mf, L) for L in range(c.n_layer)]
        self.out_hc = (
            _plain(T["output_hc_fn.weight"]),
            _plain(T["output_hc_scale.weight"]),
            _plain(T["output_hc_base.weight"]),
        )
        self.out_norm = _plain(T["output_norm.weight"])
        self.lm_head = Q8Matrix(T["output.weight"])

    def with_act_quant(self, act_quant: bool) -> RefModel:
        """A copy sharing this model's float64 weights, with activation quantization on or off."""
        other = copy.copy(self)
        other.act_quant = act_quant
        return other

    # ---- state ---------------------------------------------------------------------------
    def new_state(self) -> RefState:
        c = self.cfg
        layers = []
        for L in range(c.n_layer):
            r = c.ratio(L)
            layers.append(
                LayerState(
                    ratio=r,
                    raw=np.zeros((0, c.head_dim)),
                    comp=np.zeros((0, c.head_dim)),
                    index=np.zeros((0, c.idx_head_dim)),
                    attn=Compressor.empty(r, c.coff(L), c.head_dim) if r else None,
                    idx=Compressor.empty(r, c.coff(L), c.idx_head_dim) if c.has_indexer(L) else None,
                )
            )
        return RefState(0, layers, [], [], [])

    # ---- matmuls -------------------------------------------------------------------------
    def _q8(self, w: Q8Matrix, x: np.ndarray) -> np.ndarray:
        return w.matvec(x, self.act_quant)

    # ---- §4.4 hyper-connections ----------------------------------------------------------
    def hc_pre(self, H: np.ndarray, fn, scale, base):
        """§4.4 HC-pre: mixer from the normed flat state, Sinkhorn, weighted stream sum."""
        c = self.cfg
        n, eps = c.n_hc, c.hc_eps
        mix = fn @ rms_norm(H.reshape(-1), None, c.rms_eps)
        pre = sigmoid(mix[:n] * scale[0] + base[:n]) + eps
        post = 2.0 * sigmoid(mix[n : 2 * n] * scale[1] + base[n : 2 * n])
        C = sinkhorn((mix[2 * n :] * scale[2] + base[2 * n :]).reshape(n, n), c.hc_sinkhorn_iter, eps)
        return pre @ H, post, C

    @staticmethod
    def hc_post(H: np.ndarray, y: np.ndarray, post: np.ndarray, C: np.ndarray) -> np.ndarray:
        """§4.4 HC-post: H'[j] = post_j*y + sum_a C[a][j]*H[a] (column j of C)."""
        return post[:, None] * y[None, :] + C.T @ H

    # ---- §4.5 attention sublayer ---------------------------------------------------------
    def attention(self, ls: LayerState, W: _Layer, x: np.ndarray, pos: int, st: RefState) -> np.ndarray:
        """§4.5 one token's attention sublayer output (before HC-post); updates ls in place."""
        c = self.cfg
        xn = rms_norm(x, W.attn_norm, c.rms_eps)
        qrn = rms_norm(self._q8(W.q_a, xn), W.q_a_norm, c.rms_eps)  # step 1
        q = rms_norm(self._q8(W.q_b, qrn).reshape(c.n_head, c.head_dim), None, c.rms_eps)  # step 2
        kv = rms_norm(self._q8(W.kv, xn), W.kv_norm, c.rms_eps)  # step 3
        q = W.rope.apply(q, pos, c.n_rot)  # step 4
        kv = W.rope.apply(kv, pos, c.n_rot)
        kv = fp8_kv_sim(kv, c.n_nope, c.fp8_block)  # step 5
        self.push_raw(ls, kv)
        rows = ls.raw
        if ls.ratio:  # step 6
            self.compress_step(ls, W, xn, pos)
            sel = np.arange(ls.n_comp)
            if ls.idx is not None:
                sel = self.indexer_select(ls, W, xn, qrn, pos)
                st.index_log[-1][W.L] = (ls.n_index_comp, len(sel))
            ls.last_selected = sel
            rows = np.concatenate([ls.raw, ls.comp[sel]], axis=0)
        o = sink_attention(q, rows, W.sinks, 1.0 / math.sqrt(c.head_dim))  # step 7
        o = W.rope.apply(o, pos, c.n_rot, inverse=True)  # step 8
        return self.grouped_out(W, o.reshape(-1))  # step 9

    def push_raw(self, ls: LayerState, kv: np.ndarray) -> None:
        """§3.8/§4.5 store f16(kv) in the raw window of the last n_swa tokens."""
        ls.raw = np.concatenate([ls.raw, f16_round(kv)[None]], axis=0)[-self.cfg.n_swa :]

    def grouped_out(self, W: _Layer, o: np.ndarray) -> np.ndarray:
        """§4.10 block-diagonal attn_output_a per group of heads, then attn_output_b."""
        c = self.cfg
        gd = c.group_dim
        low = np.concatenate([self._q8(A, o[g * gd : (g + 1) * gd]) for g, A in enumerate(W.out_a_groups)])
        return self._q8(W.out_b, low)

    # ---- §4.7 compressor -----------------------------------------------------------------
    def compress_step(self, ls: LayerState, W: _Layer, xn: np.ndarray, pos: int) -> None:
        """§4.7 update the attention (and indexer) compressors; append rows on window ends."""
        c = self.cfg
        row = compressor_update(ls.attn, W.cmp, xn, pos, ls.ratio, c.head_dim, c.rms_eps, W.rope, c.n_rot)
        if row is not None:
            row = fp8_kv_sim(row, c.n_nope, c.fp8_block)
            ls.comp = np.concatenate([ls.comp, f16_round(row)[None]], axis=0)
        if ls.idx is not None:
            row = compressor_update(ls.idx, W.icmp, xn, pos, ls.ratio, c.idx_head_dim, c.rms_eps, W.rope, c.n_rot)
            if row is not None:
                row = indexer_qat(row, c.fp4_block)
                ls.index = np.concatenate([ls.index, f16_round(row)[None]], axis=0)

    # ---- §4.8 indexer --------------------------------------------------------------------
    def indexer_select(self, ls: LayerState, W: _Layer, xn, qrn, pos: int) -> np.ndarray:
        """§4.8 compressed rows to attend: all if <= top_k are visible, else the indexer top-k."""
        c = self.cfg
        nc = ls.n_index_comp
        if nc <= c.idx_top_k:
            return np.arange(nc)
        qi = (W.idx_q_b @ qrn).reshape(c.n_idx_head, c.idx_head_dim)
        qi = indexer_qat(W.rope.apply(qi, pos, c.n_rot), c.fp4_block)
        wh = (W.idx_proj @ xn) / math.sqrt(c.idx_head_dim * c.n_idx_head)
        scores = np.maximum(ls.index @ qi.T, 0.0) @ wh  # [nc]
        return np.sort(top_k_stable(scores, c.idx_top_k))

    # ---- §4.11 FFN / MoE -----------------------------------------------------------------
    def ffn(self, W: _Layer, x: np.ndarray, token: int, st: RefState) -> np.ndarray:
        """§4.11 routed experts + shared expert on z = ffn_norm(x)."""
        c = self.cfg
        z = rms_norm(x, W.ffn_norm, c.rms_eps)
        clamp = c.swiglu_clamp[W.L]
        sel, wts = self.route(W, z, token)
        st.expert_log[-1].append(sel)
        zq = q8_k_roundtrip(z) if self.act_quant else z  # Q8_K of the FFN input, once
        out = np.zeros(c.n_embd)
        for e, w in zip(sel, wts):
            gate, up, down = W.expert(int(e))
            mid = swiglu(gate @ zq, up @ zq, clamp) * w  # router weight before the down projection
            out += down @ (q8_k_roundtrip(mid) if self.act_quant else mid)
        shared = self._q8(W.sh_down, swiglu(self._q8(W.sh_gate, z), self._q8(W.sh_up, z), clamp))
        return out + shared

    def route(self, W: _Layer, z: np.ndarray, token: int) -> tuple[np.ndarray, np.ndarray]:
        """§4.11 router: sqrt-softplus probs; hash or biased top-k selection; unbiased weights."""
        c = self.cfg
        probs = np.sqrt(softplus(W.router @ z))
        if W.tid2eid is not None:
            sel = W.tid2eid[token].astype(np.int64)
        else:
            score = probs + W.router_bias if W.router_bias is not None else probs
            sel = top_k_stable(score, c.n_expert_used)
        w = probs[sel]
        if c.expert_weights_norm:
            w = w / max(w.sum(), 2.0**-14)
        return sel, w * c.expert_weights_scale

    # ---- §4.12 output head ---------------------------------------------------------------
    def head(self, H: np.ndarray) -> np.ndarray:
        """§4.12 HC head (sigmoid weights + eps), output norm, Q8_0 LM head."""
        c = self.cfg
        fn, scale, base = self.out_hc
        pre = fn @ rms_norm(H.reshape(-1), None, c.rms_eps)
        h = (sigmoid(pre * scale[0] + base) + c.hc_eps) @ H
        return self._q8(self.lm_head, rms_norm(h, self.out_norm, c.rms_eps))

    # ---- SPECULATIVE.md §1.4 the MTP draft step ---------------------------------------------
    def new_mtp_state(self) -> LayerState:
        c = self.cfg
        return LayerState(ratio=0, raw=np.zeros((0, c.head_dim)), comp=np.zeros((0, c.head_dim)),
                          index=np.zeros((0, c.idx_head_dim)), attn=None, idx=None)

    def mtp_step(self, ls: LayerState, prev_hc: np.ndarray, token: int, pos: int) -> np.ndarray:
        """One MTP draft step: logits for the token after ``token`` from the HC state
        ``prev_hc`` [n_hc, n_embd]; ``ls`` holds the MTP block's raw window (consecutive steps)."""
        c, mf = self.cfg, self._mf
        if not hasattr(self, "_mtp"):
            T = mf.mtp.tensors
            self._mtp = {
                "W": _Layer(mf, 1, mtp=True),
                "e_proj": Q8Matrix(T["mtp.0.e_proj.weight"]), "h_proj": Q8Matrix(T["mtp.0.h_proj.weight"]),
                **{k: _plain(T[f"mtp.0.{k}.weight"]) for k in ("enorm", "hnorm", "norm", "hc_head_fn",
                                                               "hc_head_scale", "hc_head_base")},
            }
        m = self._mtp
        W = m["W"]
        e = self.embd_f16[token].astype(np.float64)
        ep = self._q8(m["e_proj"], rms_norm(e, m["enorm"], c.rms_eps))
        H = np.stack([self._q8(m["h_proj"], rms_norm(r, m["hnorm"], c.rms_eps)) for r in prev_hc]) + ep[None]
        st = RefState(pos, [ls], [], [{}], [[]])
        x, post, C = self.hc_pre(H, *W.hc_attn)
        H = self.hc_post(H, self.attention(ls, W, x, pos, st), post, C)
        x, post, C = self.hc_pre(H, *W.hc_ffn)
        H = self.hc_post(H, self.ffn(W, x, token, st), post, C)
        pre = m["hc_head_fn"] @ rms_norm(H.reshape(-1), None, c.rms_eps)
        h = (sigmoid(pre * m["hc_head_scale"][0] + m["hc_head_base"]) + c.hc_eps) @ H
        return self._q8(self.lm_head, rms_norm(h, m["norm"], c.rms_eps))

    # ---- §4.14 one token -----------------------------------------------------------------
    def step(self, st: RefState, token: int) -> np.ndarray:
        """§4.14 process `token` at position st.n_tokens; returns float64 logits [n_vocab]."""
        c = self.cfg
        pos = st.n_tokens
        st.index_log.append({})
        st.expert_log.append([])
        H = np.repeat(self.embd_f16[token].astype(np.float64)[None], c.n_hc, axis=0)  # §4.2
        for W, ls in zip(self.layers, st.layers):
            x, post, C = self.hc_pre(H, *W.hc_attn)
            H = self.hc_post(H, self.attention(ls, W, x, pos, st), post, C)
            x, post, C = self.hc_pre(H, *W.hc_ffn)
            H = self.hc_post(H, self.ffn(W, x, token, st), post, C)
        st.n_tokens += 1
        st.tokens.append(int(token))
        return self.head(H)


# ----------------------------------------------------------------------------------------------
# Stateless pieces used by RefModel
# ----------------------------------------------------------------------------------------------


def sinkhorn(C: np.ndarray, iters: int, eps: float) -> np.ndarray:
    """§4.4 row softmax + eps, column normalize, then (iters-1) x (row, column) normalization."""
    C = np.exp(C - C.max(axis=1, keepdims=True))
    C = C / C.sum(axis=1, keepdims=True) + eps
    C = C / (C.sum(axis=0, keepdims=True) + eps)
    for _ in range(iters - 1):
        C = C / (C.sum(axis=1, keepdims=True) + eps)
        C = C / (C.sum(axis=0, keepdims=True) + eps)
    return C


def sink_attention(q: np.ndarray, rows: np.ndarray, sinks: np.ndarray, scale: float) -> np.ndarray:
    """§4.9 softmax over q.k*scale with a per-head sink logit in the denominator; K = V = rows."""
    s = (q @ rows.T) * scale  # [heads, rows]
    m = np.maximum(sinks, s.max(axis=1))
    e = np.exp(s - m[:, None])
    den = np.exp(sinks - m) + e.sum(axis=1)
    return (e @ rows) / den[:, None]


def compressor_update(
    cs: Compressor, w: dict, xn: np.ndarray, pos: int, ratio: int, hd: int, eps: float, rope: Rope, n_rot: int
) -> np.ndarray | None:
    """§4.7 store this token's (kv, score) row; at a window end pool, norm and rope a row.

    Returns the normed, roped (not yet FP8/FP4-simulated) row, or None.
    """
    m = pos % ratio
    R = ratio + m if ratio == 4 else m
    cs.kv[R] = w["kv"] @ xn
    cs.score[R] = w["gate"] @ xn + w["ape"][m]
    if (pos + 1) % ratio:
        return None
    if ratio == 4:  # overlapping windows: previous rows via first-half columns, current via second half
        S = np.concatenate([cs.score[:ratio, :hd], cs.score[ratio:, hd:]], axis=0)
        V = np.concatenate([cs.kv[:ratio, :hd], cs.kv[ratio:, hd:]], axis=0)
    else:
        S, V = cs.score, cs.kv
    mx = S.max(axis=0)
    e = np.exp(S - mx)
    pooled = np.where(mx <= 0.5 * NEG_INF, 0.0, (e * V).sum(axis=0) / e.sum(axis=0))
    row = rms_norm(pooled, w["norm"], eps)
    row = rope.apply(row, pos + 1 - ratio, n_rot)  # compressed row roped at its window start
    # Frontier (§5.2): ratio 4 keeps this window as the "previous" rows; everything else empties.
    if ratio == 4:
        cs.kv[:ratio], cs.score[:ratio] = cs.kv[ratio:].copy(), cs.score[ratio:].copy()
        cs.kv[ratio:], cs.score[ratio:] = 0.0, NEG_INF
    else:
        cs.kv[:], cs.score[:] = 0.0, NEG_INF
    return row
