"""GGUF opening and validation: good files load, each kind of broken file fails with one clear line."""

from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from ds4jax import config as C
from ds4jax.errors import DS4Error
from ds4jax.gguf_file import GGUFFile
from ds4jax.gguf_write import write_gguf
from ds4jax.model_file import open_model
from ds4jax.tools.make_model import generate_model

MICRO = str(Path(__file__).parent / "data" / "micro.json")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return generate_model(MICRO, tmp_path_factory.mktemp("micro"))


def rewrite(src, dst, *, drop=(), add=(), meta=None, meta_drop=(), retype=None, reshape=None):
    """Copy GGUF ``src`` to ``dst`` with edits (tensors keep their raw bytes unless edited)."""
    g = GGUFFile(src)
    md = {k: v for k, v in g.metadata.items() if k not in meta_drop and k != "general.alignment"}
    md.update(meta or {})

    def tensors():
        for name, t in g.tensors.items():
            if name in drop:
                continue
            raw = np.array(t.raw)
            tid, ne = t.type_id, t.ne
            if retype and name in retype:
                tid, raw = retype[name]
            if reshape and name in reshape:
                ne = reshape[name]
                raw = np.zeros(int(np.prod(ne)) * 4 // {C.F32: 1, C.F16: 2}[tid], np.uint8)
                raw[:] = np.random.default_rng(0).integers(0, 60, raw.shape)
            yield name, raw, tid, ne
        yield from add

    write_gguf(dst, md, tensors())
    return dst


def expect_error(match, base, mtp=None):
    with pytest.raises(DS4Error, match=match) as ei:
        open_model(base, mtp)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


def test_micro_opens(micro):
    mf = open_model(*micro)
    c = mf.config
    assert (c.n_layer, c.n_embd, c.n_vocab, c.compress_ratios) == (4, 256, 512, (0, 0, 4, 128))
    assert c.n_swa == 32 and c.idx_top_k == 16 and c.n_hash_layer == 3
    # Inventory: 6 global, 24 per layer (exp_probs_b included), +4 compressor, +6 indexer, +1 tid2eid.
    assert len(mf.base.tensors) == 6 + 4 * 24 + 2 * 4 + 6 + 3
    assert len(mf.mtp.tensors) == 32
    t = mf.base.tensors["blk.2.ffn_gate_exps.weight"]
    assert t.ne == (256, 256, 16) and t.type_id == C.IQ2_XXS
    assert mf.base.tensors["blk.3.ffn_down_exps.weight"].type_id == C.Q2_K
    assert mf.mtp.tensors["mtp.0.ffn_down_exps.weight"].type_id == C.Q4_K
    assert "blk.3.indexer.proj.weight" not in mf.base.tensors
    assert mf.base.tensors["blk.3.attn_compressor_ape.weight"].ne == (128, 128)
    assert mf.base.tensors["blk.2.attn_compressor_kv.weight"].ne == (256, 256)  # coff 2 x head 128


def test_generation_is_deterministic(micro, tmp_path):
    again = generate_model(MICRO, tmp_path)
    for a, b in zip(micro, again):
        assert Path(a).read_bytes() == Path(b).read_bytes()


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_text("hello, this is not a model\n" * 10)
    expect_error("not a GGUF file", p)
    expect_error("no such file", tmp_path / "missing.gguf")
    expect_error("is a directory", tmp_path)


@pytest.mark.parametrize("keep", [10, 3000, 0.5, -1])
def test_truncated(micro, tmp_path, keep):
    data = Path(micro[0]).read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (len(data) - 1 if keep == -1 else keep)
    p = tmp_path / "t.gguf"
    p.write_bytes(data[:n])
    expect_error("truncated", p)


def test_wrong_version(micro, tmp_path):
    data = bytearray(Path(micro[0]).read_bytes()[:64])
    data[4:8] = (2).to_bytes(4, "little")
    p = tmp_path / "v2.gguf"
    p.write_bytes(bytes(data))
    expect_error("unsupported GGUF version 2", p)


def test_wrong_architecture(micro, tmp_path):
    p = rewrite(micro[0], tmp_path / "a.gguf", meta={"general.architecture": "llama"})
    expect_error("wrong architecture 'llama'", p)


def test_missing_metadata(micro, tmp_path):
    p = rewrite(micro[0], tmp_path / "m.gguf", meta_drop={"deepseek4.embedding_length"})
    expect_error("missing metadata key deepseek4.embedding_length", p)


def test_unsupported_metadata_value(micro, tmp_path):
    p = rewrite(micro[0], tmp_path / "kv.gguf", meta={"deepseek4.attention.head_count_kv": 2})
    expect_error("head_count_kv = 2, ds4jax supports only 1", p)


def test_missing_tensor(micro, tmp_path):
    p = rewrite(micro[0], tmp_path / "mt.gguf", drop={"blk.2.indexer.proj.weight"})
    expect_error("missing tensor 'blk.2.indexer.proj.weight'", p)


def test_extra_tensor(micro, tmp_path):
    extra = ("blk.1.indexer.proj.weight", np.ones(256 * 4, np.float16), C.F16, (256, 4))
    p = rewrite(micro[0], tmp_path / "x.gguf", add=[extra])
    expect_error("unexpected tensor 'blk.1.indexer.proj.weight'", p)


def test_misshaped_tensor(micro, tmp_path):
    p = rewrite(micro[0], tmp_path / "s.gguf", reshape={"blk.0.attn_norm.weight": (128,)})
    expect_error(r"'blk.0.attn_norm.weight' has dims \[128\], expected \[256\]", p)


def test_unsupported_type(micro, tmp_path):
    g = GGUFFile(micro[0])
    q = g.tensors["blk.0.ffn_gate_exps.weight"]
    # Q5_K (13): a valid GGML type with the same 256-element blocks, but not one ds4 reads.
    n_blocks = q.nbytes // 66
    raw = np.random.default_rng(1).integers(0, 255, n_blocks * 176, dtype=np.uint8)
    p = rewrite(micro[0], tmp_path / "ty.gguf", retype={"blk.0.ffn_gate_exps.weight": (13, raw)})
    expect_error("'blk.0.ffn_gate_exps.weight' has unsupported type Q5_K", p)


def test_gate_up_type_mismatch(micro, tmp_path):
    from ds4jax.quant import encode

    g = GGUFFile(micro[0])
    ne = g.tensors["blk.1.ffn_up_exps.weight"].ne
    x = np.random.default_rng(2).standard_normal((ne[2], ne[1], ne[0])).astype(np.float32)
    raw = encode(x, C.Q2_K).reshape(-1)
    p = rewrite(micro[0], tmp_path / "gu.gguf", retype={"blk.1.ffn_up_exps.weight": (C.Q2_K, raw)})
    expect_error("must match", p)


def test_mtp_mismatch(micro, tmp_path, tiny_paths):
    base, mtp = micro
    expect_error("not an MTP file", base, base)
    p = rewrite(mtp, tmp_path / "mtp.gguf", drop={"mtp.0.exp_probs_b.bias"})
    expect_error("missing tensor 'mtp.0.exp_probs_b.bias'.*does not match base", base, p)
    # The tiny model's MTP file has the same widths but a different vocab: still fine;
    # an MTP from another shape is not.
    open_model(base, tiny_paths[1])
    other = Path(MICRO).read_text().replace('"embedding_length": 256', '"embedding_length": 512')
    (tmp_path / "wide.json").write_text(other)
    _, wide_mtp = generate_model(str(tmp_path / "wide.json"), tmp_path / "wide")
    expect_error("has dims.*does not match base", base, wide_mtp)


def test_cli_bad_files_one_line(micro, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(Path(micro[0]).read_bytes()[:5000])
    r = run_cli("ds4jax.main", f"--model={bad}", "--noload")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "truncated" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("ds4jax.main", f"--model={micro[0]}", f"--mtp={micro[0]}", "--noload")
    assert r.returncode == 1 and "not an MTP file" in r.stderr and r.stderr.count("\n") == 1


def test_cli_bad_flag_one_line():
    r = run_cli("ds4jax.main", "--no_such_flag=3")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no_such_flag" in r.stderr
    r = run_cli("ds4jax.tools.make_model", "--preset=nope", "--out=/tmp/x")
    assert r.returncode == 1 and "unknown preset 'nope'" in r.stderr and r.stderr.count("\n") == 1


def test_full_size_presets_describe_the_real_model():
    from ds4jax.presets import load_preset, preset_config

    for name, gu, dn in (("flash-q2", C.IQ2_XXS, C.Q2_K), ("flash-q4", C.Q4_K, C.Q4_K)):
        p = load_preset(name)
        c = preset_config(p)
        assert (p.gate_up_type, p.down_type) == (gu, dn)
        assert (c.n_layer, c.n_embd, c.n_head, c.head_dim, c.q_dim, c.n_expert, c.n_expert_used) == (
            43, 4096, 64, 512, 32768, 256, 6)
        assert c.compress_ratios == (0, 0) + tuple(4 if L % 2 == 0 else 128 for L in range(2, 43))
        assert (c.group_dim, c.out_low_dim, c.hc_dim, c.mix_hc) == (4096, 8192, 16384, 24)
        specs = C.base_tensor_specs(c)
        # 6 global + 23/layer (+exp_probs_b) + 4 x 41 compressor + 6 x 21 indexer + 3 tid2eid
        assert sum(not s.optional for s in specs.values()) == 6 + 23 * 43 + 4 * 41 + 6 * 21 + 3
        assert specs["blk.7.attn_output_a.weight"].ne == (4096, 8192)
        assert len(C.mtp_tensor_specs(c)) == 32
