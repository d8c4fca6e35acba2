"""ds4jax's GGUF header parser agrees with gguf-py's reader, and writes what ds4 expects."""

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType

from ds4jax.gguf_file import GGUFFile


@pytest.fixture(scope="module")
def readers(tiny_paths):
    # gguf-py's reader takes seconds on the 129k-token vocabulary: parse once.
    return [GGUFReader(p) for p in tiny_paths]


def test_parser_matches_gguf_reader(tiny_paths, readers):
    for path, ref in zip(tiny_paths, readers):
        ours = GGUFFile(path)
        keys = [k for k in ref.fields if not k.startswith("GGUF.")]
        assert sorted(keys) == sorted(ours.metadata)
        for k in keys:
            want = ref.fields[k].contents()
            got = ours.metadata[k]
            assert type(got) is type(want) and got == want, k
        assert [t.name for t in ref.tensors] == list(ours.tensors)
        for t in ref.tensors:
            o = ours.tensors[t.name]
            assert o.ne == tuple(int(x) for x in t.shape)
            assert (o.type_id, o.offset, o.nbytes) == (int(t.tensor_type), int(t.data_offset), int(t.n_bytes))
            assert np.array_equal(o.raw, ref.data[t.data_offset : t.data_offset + t.n_bytes])


def test_metadata_value_types_as_ds4_reads_them(readers):
    ref = readers[0]
    T = GGUFValueType

    def types(k):
        return ref.fields[k].types

    assert types("deepseek4.block_count") == [T.UINT32]
    assert types("deepseek4.context_length") == [T.UINT64]
    assert types("deepseek4.rope.scaling.original_context_length") == [T.UINT64]
    assert types("deepseek4.expert_weights_norm") == [T.BOOL]
    assert types("deepseek4.expert_weights_scale") == [T.FLOAT32]
    assert types("deepseek4.attention.compress_ratios") == [T.ARRAY, T.UINT32]
    assert types("deepseek4.swiglu_clamp_exp") == [T.ARRAY, T.FLOAT32]
    assert types("tokenizer.ggml.tokens") == [T.ARRAY, T.STRING]
    assert types("tokenizer.ggml.merges") == [T.ARRAY, T.STRING]
    assert types("tokenizer.ggml.token_type") == [T.ARRAY, T.INT32]
    assert ref.fields["general.architecture"].contents() == "deepseek4"
