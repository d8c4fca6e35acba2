"""A human-readable summary of an opened model: shapes, quant types, bytes, MTP."""

from __future__ import annotations

import collections

from ds4jax.model_file import ModelFiles, type_name


def _mb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def decode_bytes_per_token(mf: ModelFiles) -> int:
    """Weight bytes one decode step reads: everything but the embedding table
    (one row) and the unselected routed experts (n_used of n_expert)."""
    c = mf.config
    total = 0
    for name, t in mf.base.tensors.items():
        if name == "token_embd.weight":
            total += t.nbytes // c.n_vocab
        elif name.endswith("_exps.weight"):
            total += t.nbytes * c.n_expert_used // c.n_expert
        elif name.endswith("ffn_gate_tid2eid.weight"):
            total += t.nbytes // c.n_vocab
        else:
            total += t.nbytes
    return total


def _expert_types(g) -> str:
    kinds = collections.Counter()
    for name, t in g.tensors.items():
        if name.endswith("ffn_gate_exps.weight"):
            down = g.tensors[name.replace("gate_exps", "down_exps")]
            kinds[f"gate/up {type_name(t.type_id)}, down {type_name(down.type_id)}"] += 1
    return "; ".join(f"{k}" + (f" ({n} layers)" if len(kinds) > 1 else "") for k, n in kinds.items())


def _by_type(g) -> str:
    agg: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for t in g.tensors.values():
        a = agg[type_name(t.type_id)]
        a[0] += 1
        a[1] += t.nbytes
    return ", ".join(f"{k} {n} ({_mb(b)})" for k, (n, b) in sorted(agg.items(), key=lambda kv: -kv[1][1]))


def model_summary(mf: ModelFiles) -> str:
    c = mf.config
    ratios = ",".join(str(r) for r in c.compress_ratios)
    base_bytes = sum(t.nbytes for t in mf.base.tensors.values())
    lines = [
        f"model      {mf.base.path}",
        f"name       {c.name}",
        f"layers     {c.n_layer} (compress ratios {ratios}; hash-routed layers 0..{c.n_hash_layer - 1})",
        f"widths     embd {c.n_embd}, vocab {c.n_vocab}, HC {c.n_hc} streams x {c.n_embd} (Sinkhorn {c.hc_sinkhorn_iter})",
        (
            f"attention  {c.n_head} heads x {c.head_dim} (rope {c.n_rot}), one K=V head, q rank {c.q_lora_rank}, "
            f"output {c.n_out_group} groups x rank {c.o_lora_rank}, sliding window {c.n_swa}"
        ),
        f"indexer    {c.n_idx_head} heads x {c.idx_head_dim}, top-k {c.idx_top_k}",
        f"moe        {c.n_expert} experts ({c.n_expert_used} used) x ff {c.n_ff_exp} + 1 shared; {_expert_types(mf.base)}",
        f"context    {c.n_ctx_train} (trained)",
        f"tensors    {len(mf.base.tensors)}, {_mb(base_bytes)}: {_by_type(mf.base)}",
        f"per token  {_mb(decode_bytes_per_token(mf))} of weights read by one decode step",
    ]
    if mf.mtp is not None:
        mtp_bytes = sum(t.nbytes for t in mf.mtp.tensors.values())
        lines.append(
            f"mtp        {mf.mtp.path}: {len(mf.mtp.tensors)} tensors, {_mb(mtp_bytes)}; {_expert_types(mf.mtp)}"
        )
    else:
        lines.append("mtp        not loaded")
    return "\n".join(lines)
