"""The model's shape and constants, read from ``deepseek4.*`` GGUF metadata.

Every shape in ds4jax derives from one frozen ``ModelConfig``. Keys are ds4's
own names (MODEL.md §2.2). Where ds4 fixes a number in C, the key is optional
and ds4's value is the default, so the same code runs the real model and small
generated ones. Keys that ds4 does not know live in ``deepseek4.`` too:

* ``deepseek4.attention.fp8_block_size``   (64)  FP8 KV simulation block
* ``deepseek4.attention.indexer.fp4_block_size`` (32) FP4 indexer simulation block
* ``deepseek4.think_max_min_context``      (393216) think-max downgrade threshold

Structural keys (widths, counts, ratios) are required: a file without them is
not a DeepSeek V4 model. Combinations this engine cannot run (several KV heads,
grouped expert routing, ...) are rejected with a one-line ``DS4Error``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ds4jax.errors import DS4Error

ARCH = "deepseek4"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str
    n_layer: int
    n_embd: int
    n_vocab: int
    n_head: int
    head_dim: int
    n_rot: int
    q_lora_rank: int
    o_lora_rank: int
    n_out_group: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_hash_layer: int
    n_swa: int
    n_idx_head: int
    idx_head_dim: int
    idx_top_k: int
    n_hc: int
    hc_sinkhorn_iter: int
    compress_ratios: tuple[int, ...]
    swiglu_clamp: tuple[float, ...]
    rope_freq_base: float
    compress_rope_freq_base: float
    rope_scale_factor: float
    yarn_beta_fast: float
    yarn_beta_slow: float
    rope_orig_ctx: int
    expert_weights_scale: float
    expert_weights_norm: bool
    rms_eps: float
    hc_eps: float
    n_ctx_train: int
    fp8_block: int = 64
    fp4_block: int = 32
    think_max_min_context: int = 393216
    # Numerics choice, not model metadata: quantize activations to int8 blocks before
    # quantized matmuls as ds4's CPU/CUDA paths do (False: f32 activations, like Metal).
    act_quant: bool = True

    # ---- derived shapes -------------------------------------------------
    @property
    def hc_dim(self) -> int:  # the 4 residual streams, flattened
        return self.n_hc * self.n_embd

    @property
    def mix_hc(self) -> int:  # mixer rows: pre n_hc | post n_hc | comb n_hc x n_hc
        return 2 * self.n_hc + self.n_hc * self.n_hc

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def n_nope(self) -> int:  # non-rotary head dims (FP8-simulated in KV rows)
        return self.head_dim - self.n_rot

    @property
    def group_dim(self) -> int:  # attention values feeding one output group
        return (self.n_head // self.n_out_group) * self.head_dim

    @property
    def out_low_dim(self) -> int:
        return self.n_out_group * self.o_lora_rank

    @property
    def idx_q_dim(self) -> int:
        return self.n_idx_head * self.idx_head_dim

    def ratio(self, layer: int) -> int:
        return self.compress_ratios[layer]

    def coff(self, layer: int) -> int:
        """Compressor width factor: ratio-4 windows overlap (previous + current)."""
        return 2 if self.compress_ratios[layer] == 4 else 1

    def has_indexer(self, layer: int) -> bool:
        return self.compress_ratios[layer] == 4

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.n_hash_layer


# (key, type-kind, default or REQUIRED). Kinds: "u" unsigned int, "f" number, "b" bool.
REQUIRED = object()
_SCALARS: tuple[tuple[str, str, str, Any], ...] = (
    ("n_layer", "block_count", "u", REQUIRED),
    ("n_embd", "embedding_length", "u", REQUIRED),
    ("n_vocab", "vocab_size", "u", REQUIRED),
    ("n_head", "attention.head_count", "u", REQUIRED),
    ("head_dim", "attention.key_length", "u", REQUIRED),
    ("n_rot", "rope.dimension_count", "u", REQUIRED),
    ("q_lora_rank", "attention.q_lora_rank", "u", REQUIRED),
    ("o_lora_rank", "attention.output_lora_rank", "u", REQUIRED),
    ("n_out_group", "attention.output_group_count", "u", REQUIRED),
    ("n_expert", "expert_count", "u", REQUIRED),
    ("n_expert_used", "expert_used_count", "u", REQUIRED),
    ("n_ff_exp", "expert_feed_forward_length", "u", REQUIRED),
    ("n_idx_head", "attention.indexer.head_count", "u", REQUIRED),
    ("idx_head_dim", "attention.indexer.key_length", "u", REQUIRED),
    ("n_hc", "hyper_connection.count", "u", REQUIRED),
    ("n_hash_layer", "hash_layer_count", "u", 3),
    ("n_swa", "attention.sliding_window", "u", 128),
    ("idx_top_k", "attention.indexer.top_k", "u", 512),
    ("hc_sinkhorn_iter", "hyper_connection.sinkhorn_iterations", "u", 20),
    ("rope_freq_base", "rope.freq_base", "f", 10000.0),
    ("compress_rope_freq_base", "attention.compress_rope_freq_base", "f", 160000.0),
    ("rope_scale_factor", "rope.scaling.factor", "f", 16.0),
    ("yarn_beta_fast", "rope.scaling.yarn_beta_fast", "f", 32.0),
    ("yarn_beta_slow", "rope.scaling.yarn_beta_slow", "f", 1.0),
    ("rope_orig_ctx", "rope.scaling.original_context_length", "u", 65536),
    ("expert_weights_scale", "expert_weights_scale", "f", 1.5),
    ("expert_weights_norm", "expert_weights_norm", "b", True),
    ("rms_eps", "attention.layer_norm_rms_epsilon", "f", 1e-6),
    ("hc_eps", "hyper_connection.epsilon", "f", 1e-6),
    ("n_ctx_train", "context_length", "u", 1048576),
    ("fp8_block", "attention.fp8_block_size", "u", 64),
    ("fp4_block", "attention.indexer.fp4_block_size", "u", 32),
    ("think_max_min_context", "think_max_min_context", "u", 393216),
)
# Keys whose value ds4jax can only run at one setting: (key, value, required, why).
_FIXED = (
    ("attention.head_count_kv", 1, True, "a single shared K=V head"),
    ("expert_shared_count", 1, True, "exactly one shared expert"),
    ("expert_group_count", 0, False, "no grouped expert routing"),
    ("expert_group_used_count", 0, False, "no grouped expert routing"),
)


def _key(k: str) -> str:
    return f"{ARCH}.{k}"


def _scalar(md: Mapping[str, Any], key: str, kind: str, default: Any, src: str) -> Any:
    full = _key(key)
    if full not in md:
        if default is REQUIRED:
            raise DS4Error(f"{src}: missing metadata key {full}")
        return default
    v = md[full]
    if kind == "b":
        if not isinstance(v, bool):
            raise DS4Error(f"{src}: metadata {full} must be a bool, got {v!r}")
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise DS4Error(f"{src}: metadata {full} must be a number, got {v!r}")
    if kind == "u":
        if isinstance(v, float) or v < 0:
            raise DS4Error(f"{src}: metadata {full} must be a non-negative integer, got {v!r}")
        return int(v)
    return float(v)


def _per_layer(md: Mapping[str, Any], key: str, n_layer: int, src: str, default=REQUIRED) -> list:
    full = _key(key)
    if full not in md:
        if default is REQUIRED:
            raise DS4Error(f"{src}: missing metadata key {full}")
        return [default] * n_layer
    v = md[full]
    if not isinstance(v, list) or len(v) < n_layer:
        raise DS4Error(f"{src}: metadata {full} must be an array of at least {n_layer} values")
    return list(v[:n_layer])


def config_from_metadata(md: Mapping[str, Any], src: str = "model") -> ModelConfig:
    """Build and check the config. ``src`` (usually the path) prefixes error messages."""
    arch = md.get("general.architecture")
    if arch != ARCH:
        raise DS4Error(f"{src}: wrong architecture {arch!r} (need {ARCH!r})")
    vals = {name: _scalar(md, key, kind, d, src) for name, key, kind, d in _SCALARS}
    for key, want, required, why in _FIXED:
        got = md.get(_key(key), None if required else want)
        if got is None:
            raise DS4Error(f"{src}: missing metadata key {_key(key)}")
        if got != want:
            raise DS4Error(f"{src}: metadata {_key(key)} = {got}, ds4jax supports only {want} ({why})")
    n_layer = vals["n_layer"]
    ratios = _per_layer(md, "attention.compress_ratios", n_layer, src)
    for i, r in enumerate(ratios):
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise DS4Error(f"{src}: compress_ratios[{i}] = {r!r} is not a valid ratio")
        if r not in (0, 1) and r & (r - 1):
            raise DS4Error(f"{src}: compress_ratios[{i}] = {r}: ratios must be 0 or a power of two")
        if r == 1:
            raise DS4Error(f"{src}: compress_ratios[{i}] = 1 is not a compression ratio")
    clamp = _per_layer(md, "swiglu_clamp_exp", n_layer, src, default=10.0)
    vals["compress_ratios"] = tuple(int(r) for r in ratios)
    vals["swiglu_clamp"] = tuple(float(c) for c in clamp)
    if _key("attention.value_length") in md and md[_key("attention.value_length")] != vals["head_dim"]:
        raise DS4Error(f"{src}: attention.value_length must equal key_length (K = V in DeepSeek V4)")
    vals["name"] = str(md.get("general.name", "unnamed"))
    cfg = ModelConfig(**vals)
    _check_consistency(cfg, src)
    return cfg


def _check_consistency(c: ModelConfig, src: str) -> None:
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise DS4Error(f"{src}: inconsistent metadata: {what}")

    need(c.n_layer >= 1 and c.n_embd >= 1 and c.n_vocab >= 2, "empty model")
    need(c.n_rot % 2 == 0 and 0 < c.n_rot < c.head_dim, "rope.dimension_count must be even and below key_length")
    need(c.n_rot < c.idx_head_dim, "rope.dimension_count must be below indexer.key_length")
    need(c.n_nope % c.fp8_block == 0, f"non-rotary head dims {c.n_nope} not a multiple of the FP8 block {c.fp8_block}")
    need(c.idx_head_dim & (c.idx_head_dim - 1) == 0, "indexer.key_length must be a power of two (Hadamard)")
    need(c.idx_head_dim % c.fp4_block == 0, "indexer.key_length not a multiple of the FP4 block")
    need(c.n_head % c.n_out_group == 0, "head_count not divisible by output_group_count")
    need(0 < c.n_expert_used <= c.n_expert, "expert_used_count must be in 1..expert_count")
    need(c.n_hash_layer <= c.n_layer, "hash_layer_count exceeds block_count")
    need(c.n_hc >= 1 and c.hc_sinkhorn_iter >= 1, "hyper-connection count and Sinkhorn iterations must be >= 1")
    need(c.n_swa >= 1 and c.idx_top_k >= 1, "sliding_window and indexer.top_k must be >= 1")
    for L in range(c.n_layer):
        r = c.compress_ratios[L]
        need(r == 0 or r >= c.coff(L), f"layer {L} compress ratio {r}")


# ---- tensor inventory ------------------------------------------------------------
# GGML type ids (MODEL.md §2.1); the quant package owns the codecs.
F32, F16, Q8_0, Q2_K, Q4_K, IQ2_XXS, I32 = 0, 1, 8, 10, 12, 16, 26
EXPERT_TYPES = frozenset({IQ2_XXS, Q2_K, Q4_K})
PLAIN_TYPES = frozenset({F16, F32})


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    ne: tuple[int, ...]  # GGUF order, ne[0] fastest
    types: frozenset[int]
    optional: bool = False


def _s(ne, *types, optional=False) -> TensorSpec:
    return TensorSpec(tuple(ne), frozenset(types), optional)


def _block_specs(c: ModelConfig, L: int, prefix: str, mtp: bool) -> dict[str, TensorSpec]:
    """The tensors of one transformer block (base layer L, or the MTP block)."""
    E, H, F = c.n_embd, c.n_hc, c.n_ff_exp
    plain = PLAIN_TYPES if mtp else frozenset({F16})
    s = {
        "hc_attn_fn.weight": TensorSpec((c.hc_dim, c.mix_hc), plain),
        "hc_attn_scale.weight": _s([3], F32),
        "hc_attn_base.weight": _s([c.mix_hc], F32),
        "attn_norm.weight": _s([E], F32),
        "attn_q_a.weight": _s([E, c.q_lora_rank], Q8_0),
        "attn_q_a_norm.weight": _s([c.q_lora_rank], F32),
        "attn_q_b.weight": _s([c.q_lora_rank, c.q_dim], Q8_0),
        "attn_kv.weight": _s([E, c.head_dim], Q8_0),
        "attn_kv_a_norm.weight": _s([c.head_dim], F32),
        "attn_sinks.weight": _s([c.n_head], F32),
        "attn_output_a.weight": _s([c.group_dim, c.out_low_dim], Q8_0),
        "attn_output_b.weight": _s([c.out_low_dim, E], Q8_0),
        "hc_ffn_fn.weight": TensorSpec((c.hc_dim, c.mix_hc), plain),
        "hc_ffn_scale.weight": _s([3], F32),
        "hc_ffn_base.weight": _s([c.mix_hc], F32),
        "ffn_norm.weight": _s([E], F32),
        "ffn_gate_inp.weight": TensorSpec((E, c.n_expert), plain),
        "exp_probs_b.bias": _s([c.n_expert], F32, optional=not mtp),
        "ffn_gate_exps.weight": TensorSpec((E, F, c.n_expert), EXPERT_TYPES),
        "ffn_up_exps.weight": TensorSpec((E, F, c.n_expert), EXPERT_TYPES),
        "ffn_down_exps.weight": TensorSpec((F, E, c.n_expert), EXPERT_TYPES),
        "ffn_gate_shexp.weight": _s([E, F], Q8_0),
        "ffn_up_shexp.weight": _s([E, F], Q8_0),
        "ffn_down_shexp.weight": _s([F, E], Q8_0),
    }
    if mtp:
        s.update({
            "e_proj.weight": _s([E, E], Q8_0),
            "h_proj.weight": _s([E, E], Q8_0),
            "enorm.weight": _s([E], F32),
            "hnorm.weight": _s([E], F32),
            "norm.weight": _s([E], F32),
            "hc_head_fn.weight": TensorSpec((c.hc_dim, H), PLAIN_TYPES),
            "hc_head_base.weight": _s([H], F32),
            "hc_head_scale.weight": _s([1], F32),
        })
    else:
        if c.is_hash_layer(L):
            s["ffn_gate_tid2eid.weight"] = _s([c.n_expert_used, c.n_vocab], I32)
        r = c.ratio(L)
        if r:
            W = c.coff(L) * c.head_dim
            s.update({
                "attn_compressor_ape.weight": _s([W, r], F16),
                "attn_compressor_kv.weight": _s([E, W], F16),
                "attn_compressor_gate.weight": _s([E, W], F16),
                "attn_compressor_norm.weight": _s([c.head_dim], F32),
            })
        if c.has_indexer(L):
            Wi = c.coff(L) * c.idx_head_dim
            s.update({
                "indexer.attn_q_b.weight": _s([c.q_lora_rank, c.idx_q_dim], F16),
                "indexer.proj.weight": _s([E, c.n_idx_head], F16),
                "indexer_compressor_ape.weight": _s([Wi, r], F16),
                "indexer_compressor_kv.weight": _s([E, Wi], F16),
                "indexer_compressor_gate.weight": _s([E, Wi], F16),
                "indexer_compressor_norm.weight": _s([c.idx_head_dim], F32),
            })
    return {prefix + k: v for k, v in s.items()}


def base_tensor_specs(c: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor of a base GGUF, in ds4's layout (MODEL.md §2.3)."""
    E = c.n_embd
    specs = {
        "token_embd.weight": _s([E, c.n_vocab], F16),
        "output_hc_base.weight": _s([c.n_hc], F32),
        "output_hc_fn.weight": _s([c.hc_dim, c.n_hc], F16),
        "output_hc_scale.weight": _s([1], F32),
        "output_norm.weight": _s([E], F32),
        "output.weight": _s([E, c.n_vocab], Q8_0),
    }
    for L in range(c.n_layer):
        specs.update(_block_specs(c, L, f"blk.{L}.", mtp=False))
    return specs


MTP_PREFIX = "mtp.0."


def mtp_tensor_specs(c: ModelConfig) -> dict[str, TensorSpec]:
    """The tensors of an MTP GGUF (SPECULATIVE.md §1.2), shaped by the base config."""
    return _block_specs(c, -1, MTP_PREFIX, mtp=True)
