"""Tokenizer built from GGUF metadata vs DeepSeek V4's official tokenizer.json."""

from __future__ import annotations

import json
import random
import time

import pytest
from tokenizers import Tokenizer as HFTokenizer

from ds4jax.errors import DS4Error
from ds4jax.tokenizer import (
    PRE_TOKENIZERS,
    SPECIAL_TEXTS,
    TOKEN_TYPE_CONTROL,
    TOKEN_TYPE_NORMAL,
    TOKEN_TYPE_USER_DEFINED,
    StreamDecoder,
    Tokenizer,
)
from ds4jax.tokenizer_data import add_to_gguf_writer, default_tokenizer_json_path, gguf_tokenizer_metadata

EXPECTED_IDS = {
    "bos": 0,
    "eos": 1,
    "user": 128803,
    "assistant": 128804,
    "think_start": 128821,
    "think_end": 128822,
    "dsml": 128825,
}


def _read_metadata(path) -> dict:
    try:
        from ds4jax.gguf_file import GGUFFile
    except ImportError:  # TODO: drop once ds4jax.gguf_file.GGUFFile is always present
        GGUFFile = None
    if GGUFFile is not None:
        return dict(GGUFFile(path).metadata)
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def json_path():
    return default_tokenizer_json_path()


@pytest.fixture(scope="session")
def official(json_path):
    return HFTokenizer.from_file(str(json_path))


@pytest.fixture(scope="session")
def official_plain(json_path):
    """The official file's pre-tokenizer + BPE with no added tokens at all."""
    doc = json.loads(json_path.read_text(encoding="utf-8"))
    doc["added_tokens"] = []
    return HFTokenizer.from_str(json.dumps(doc, ensure_ascii=False))


@pytest.fixture(scope="session")
def gguf_path(tmp_path_factory):
    import gguf

    path = tmp_path_factory.mktemp("tok") / "vocab.gguf"
    w = gguf.GGUFWriter(str(path), "deepseek4")  # writes general.architecture
    add_to_gguf_writer(w, gguf_tokenizer_metadata())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def md(gguf_path):
    return _read_metadata(gguf_path)


@pytest.fixture(scope="session")
def tok(md):
    return Tokenizer.from_gguf_metadata(md)


# ---------------------------------------------------------------------- corpus
_FRAGMENTS = [
    # code
    "def foo(x):\n    return x.append(1)  # comment\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
    "const f = async () => { await fetch(`/api/${id}`); };\r\n",
    "fn main() -> Result<(), Box<dyn Error>> {\n    println!(\"{:?}\", v);\n}",
    "SELECT a, b FROM t WHERE x >= 10 AND y <> 'z';\n",
    "if [ -f ~/.bashrc ]; then . ~/.bashrc; fi\n",
    "<div class=\"x\">&amp;&lt;</div>>;\n",
    "self.__init__(**kwargs)",
    "x=[1,2,3];y={'a':None}",
    "#include <stdio.h>\nint main(void){return 0;}\n",
    "    \t  indented\ttabs\t\tand  spaces",
    # Italian / European
    "Perché l'analisi è già pronta? Sì, però c'è un problema: «così», ecco.",
    "L'università di Bologna — fondata nel 1088 — è la più antica.",
    "Ça va? Où est l'hôtel? Größe, Straße, naïve café, Ærø, Łódź.",
    "“Quoted” ‘single’ „German“ ‹angle› «guillemets»,",
    "Он сказал: «Привет, мир!» — и ушёл.",
    "Ελληνικά κείμενα με τόνους.",
    # CJK
    "中文分词测试，包括标点符号。\n第二行：数字１２３和123。",
    "我们今天去北京天安门广场看升旗仪式吧！",
    "日本語のテキスト、ひらがなとカタカナ、漢字。\n",
    "ｶﾀｶﾅ半角とＡＢＣ全角",
    "한국어 문장도 포함합니다.",
    "مرحبا بالعالم ١٢٣٤",
    "नमस्ते दुनिया",
    # numbers
    "0", "7", "42", "123", "1234", "12345", "123456789", "3.14159265358979",
    "1,000,000", "1_000_000", "-0.5e-10", "0x1F2E3D", "2024-05-21T12:34:56Z",
    "ⅫⅣ", "²³¹", "٣٤٥", "１２３４５",
    # whitespace
    "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\r\n", "\r\n\r\n", " \n ", "  \n\t\n  ",
    "a  1", "a   12", "x\t\t3", "  word", "   word", "\u00a0nbsp", "\u3000ideographic",
    # punctuation
    "»,", "?”", "。\n", "!!!", "...", "…", "—", "?!\n\n", ":\n", ");\n", ">;\n", " (", " «", "“",
    "%%", "$$", "@@", "~~~", "\\\\", "''", "\"\"",
    # emoji
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "❤️", "🇮🇹🇯🇵", "a😀b", "🙂🙃🙂",
    # misc unicode
    "e\u0301", "\u200b", "\ufeff", "\x00", "\x7f", "\x1b[0m", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𠜎𠜱",
    # special-token strings embedded
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
    "<think>", "</think>", "｜DSML｜", "<｜DSML｜invoke name=\"x\">", "</｜DSML｜parameter>",
    "<｜fim▁hole｜>", "<｜tool▁sep｜>", "<dsml:", "</dsml:", "<|EOT|>", "<｜/table>｜DSML｜",
    "<｜▁pad▁｜>", "<｜place▁holder▁no▁797｜>", "<tool_result>", "<｜latest_reminder｜>",
    "<thinking>", "<think", "think>", "<｜User", "｜>", "｜",
]

_WORDS = ["the", "The", "ciao", "mondo", "data", "AI", "x", "URL", "café", "数据", "かな", "word"]
_SEPS = ["", " ", "  ", "   ", "\t", "\n", "\r\n", " \n", "\n\n", ", ", ". ", "»,", "?”", "。\n", "  \t "]


def _corpus(n: int = 3000) -> list[str]:
    rng = random.Random(20240521)
    out = list(_FRAGMENTS)
    # numbers of many lengths, with varied preceding whitespace
    for k in range(1, 25):
        digits = "".join(str((i * 7 + k) % 10) for i in range(k))
        for pre in ("", " ", "  ", "   ", "\t", "\n", "x", "a "):
            out.append(pre + digits)
    while len(out) < n:
        parts = []
        for _ in range(rng.randint(1, 8)):
            r = rng.random()
            if r < 0.35:
                parts.append(rng.choice(_FRAGMENTS))
            elif r < 0.6:
                parts.append(rng.choice(_WORDS))
            elif r < 0.75:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 12))))
            else:
                parts.append(rng.choice(_SEPS))
            parts.append(rng.choice(_SEPS))
        out.append("".join(parts))
    return out


def _fuzz(n: int = 1500) -> list[str]:
    """Random strings over a mixed alphabet (all Unicode categories the regex cares about)."""
    rng = random.Random(99)
    ranges = [(0x20, 0x7E), (0x09, 0x0D), (0xA0, 0xFF), (0x2000, 0x206F), (0x4E00, 0x4E80),
              (0x3040, 0x30FF), (0xAC00, 0xAC40), (0x1F300, 0x1F64F), (0x0300, 0x036F),
              (0x0660, 0x0669), (0xFF10, 0xFF19), (0x2070, 0x2079), (0x2160, 0x216F),
              (0x0400, 0x04FF), (0x0600, 0x06FF), (0x3000, 0x303F), (0xFF01, 0xFF5E)]
    pieces = ["｜", "▁", "<", ">", "</", "<｜", "｜>", "think", "User", "DSML", "\r\n", "  ", "\t"]
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 24)):
            if rng.random() < 0.15:
                chars.append(rng.choice(pieces))
            else:
                lo, hi = rng.choice(ranges)
                chars.append(chr(rng.randint(lo, hi)))
        out.append("".join(chars))
    return out


CORPUS = _corpus() + _fuzz()


# ---------------------------------------------------------------------- tests
def test_metadata_roundtrip(md, gguf_path):
    ref = gguf_tokenizer_metadata()
    assert md["general.architecture"] == "deepseek4"
    for key, value in ref.items():
        assert md[key] == value, key
    assert md["tokenizer.ggml.model"] == "gpt2"
    assert md["tokenizer.ggml.pre"] == "joyai-llm"
    assert len(md["tokenizer.ggml.tokens"]) == 129280
    assert len(md["tokenizer.ggml.merges"]) == 127741
    assert md["tokenizer.ggml.bos_token_id"] == 0
    assert md["tokenizer.ggml.eos_token_id"] == 1
    assert gguf_tokenizer_metadata() is ref  # cached


def test_token_types(md):
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    by_text = dict(zip(tokens, types))
    for t in ("<think>", "</think>", "｜DSML｜", "<dsml:", "</dsml:", "<｜/table>｜"):
        assert by_text[t] == TOKEN_TYPE_USER_DEFINED, t
    for t in ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
              "<｜tool▁sep｜>", "<|EOT|>", "<｜place▁holder▁no▁797｜>"):
        assert by_text[t] == TOKEN_TYPE_CONTROL, t
    assert types.count(TOKEN_TYPE_NORMAL) == 127997
    assert types.count(TOKEN_TYPE_USER_DEFINED) == 6
    assert set(types) == {TOKEN_TYPE_NORMAL, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED}


def test_pretokenizer_table_matches_official_file(json_path):
    doc = json.loads(json_path.read_text(encoding="utf-8"))
    assert PRE_TOKENIZERS["joyai-llm"]["pre_tokenizer"] == doc["pre_tokenizer"]
    assert PRE_TOKENIZERS["joyai-llm"]["decoder"] == doc["decoder"]


def test_special_ids(tok):
    assert tok.n_vocab == 129280
    assert tok.special_ids == EXPECTED_IDS
    assert (tok.bos_id, tok.eos_id, tok.user_id, tok.assistant_id) == (0, 1, 128803, 128804)
    assert (tok.think_start_id, tok.think_end_id, tok.dsml_id) == (128821, 128822, 128825)
    for role, text in SPECIAL_TEXTS.items():
        assert tok.token_to_id(text) == EXPECTED_IDS[role]


def test_build_is_fast(md):
    t0 = time.perf_counter()
    Tokenizer.from_gguf_metadata(md)
    assert time.perf_counter() - t0 < 6.0


def test_special_mode_matches_official(tok, official):
    want = [e.ids for e in official.encode_batch(CORPUS, add_special_tokens=False)]
    got = tok.encode_batch(CORPUS, special=True)
    for s, g, w in zip(CORPUS, got, want):
        assert g == w, repr(s)
    # single-call path agrees with the batch path
    for s, w in zip(CORPUS[:300], want):
        assert tok.encode(s, special=True) == w, repr(s)


def test_plain_mode_matches_official_without_added_tokens(tok, official_plain, official):
    want = [e.ids for e in official_plain.encode_batch(CORPUS, add_special_tokens=False)]
    got = tok.encode_batch(CORPUS, special=False)
    assert got == want
    for s, w in zip(CORPUS[:300], want):
        assert tok.encode(s) == w, repr(s)
    # no added token ever comes out of plain-mode BPE
    for ids in got:
        assert not any(tok.is_added(i) for i in ids)
    # text without added-token strings: both modes agree with the official tokenizer
    added = [t for i, t in enumerate(tok._tokens) if tok.is_added(i)]
    plain_texts = [s for s in CORPUS if not any(a in s for a in added)]
    assert len(plain_texts) > 1000
    want_full = [e.ids for e in official.encode_batch(plain_texts, add_special_tokens=False)]
    assert tok.encode_batch(plain_texts) == want_full


def test_typed_control_strings_stay_literal(tok):
    for role, text in SPECIAL_TEXTS.items():
        s = f"hello {text} world"
        plain = tok.encode(s)
        assert EXPECTED_IDS[role] not in plain
        assert not any(tok.is_added(i) for i in plain)
        assert EXPECTED_IDS[role] in tok.encode(s, special=True)
        assert tok.decode(plain) == s
    assert tok.encode("<｜User｜>", special=True) == [128803]
    assert 128803 not in tok.encode("<｜User｜>")


def test_roundtrip_both_modes(tok):
    for special in (False, True):
        batch = tok.encode_batch(CORPUS, special=special)
        for s, ids in zip(CORPUS, batch):
            assert tok.decode(ids) == s, repr(s)
            assert b"".join(tok.token_bytes(i) for i in ids) == s.encode("utf-8"), repr(s)


def test_decode_matches_official(tok, official):
    rng = random.Random(7)
    for _ in range(300):
        ids = [rng.randrange(tok.n_vocab) for _ in range(rng.randint(1, 12))]
        want = official.decode(ids, skip_special_tokens=False)
        assert tok.decode(ids) == want
        assert b"".join(tok.token_bytes(i) for i in ids).decode("utf-8", "replace") == want


def test_added_tokens_single_ids(tok, official):
    for i in range(tok.n_vocab):
        if not tok.is_added(i):
            continue
        text = tok.token_text(i)
        assert tok.encode(text, special=True) == [i]
        assert official.encode(text, add_special_tokens=False).ids == [i]
        assert tok.decode([i]) == text
        assert tok.token_bytes(i) == text.encode("utf-8")


def test_official_not_ds4_splits(tok):
    # MODEL.md §7.2: ds4 splits these in two, the official tokenizer does not.
    for s in ("»,", "?”", "。\n"):
        assert len(tok.encode(s)) == 1, s


def test_stream_decoder(tok):
    texts = [s for s in CORPUS[:500]] + ["👨‍👩‍👧‍👦𠜎 e\u0301 中文", "🇮🇹" * 5]
    held_back = 0
    for s in texts:
        ids = tok.encode(s)
        sd = tok.stream_decoder()
        pieces = []
        for i in ids:
            pieces.append(sd.feed(i))
            held_back += sd.pending
        pieces.append(sd.flush())
        assert "".join(pieces) == s
    assert held_back > 0  # some tokens end inside a UTF-8 character
    # an incomplete character is never emitted early; flush gives U+FFFD
    ids = tok.encode("𠜎")
    first = tok.token_bytes(ids[0])
    assert len(ids) > 1 and len(first) < 4
    sd = StreamDecoder(tok)
    assert sd.feed(ids[0]) == "" and sd.pending
    assert sd.flush() == "\ufffd"
    sd2 = StreamDecoder(tok)
    assert sd2.feed(ids) == "𠜎" and not sd2.pending


def test_bad_ids(tok):
    with pytest.raises(DS4Error):
        tok.decode([tok.n_vocab])
    with pytest.raises(DS4Error):
        tok.token_bytes(-1)


def _modified(md, **changes):
    out = dict(md)
    for k, v in changes.items():
        key = "tokenizer.ggml." + k
        if v is None:
            out.pop(key)
        else:
            out[key] = v
    return out


def test_bad_metadata(md):
    with pytest.raises(DS4Error, match="unknown pre-tokenizer"):
        Tokenizer.from_gguf_metadata(_modified(md, pre="llama-bpe"))
    with pytest.raises(DS4Error, match="expected 'gpt2'"):
        Tokenizer.from_gguf_metadata(_modified(md, model="llama"))
    with pytest.raises(DS4Error, match="missing key tokenizer.ggml.merges"):
        Tokenizer.from_gguf_metadata(_modified(md, merges=None))
    with pytest.raises(DS4Error, match="missing key tokenizer.ggml.tokens"):
        Tokenizer.from_gguf_metadata(_modified(md, tokens=None))
    with pytest.raises(DS4Error, match="token types"):
        Tokenizer.from_gguf_metadata(_modified(md, token_type=md["tokenizer.ggml.token_type"][:-1]))
    tokens = list(md["tokenizer.ggml.tokens"])
    tokens[0] = "<｜BOS｜>"
    with pytest.raises(DS4Error, match="begin▁of▁sentence"):
        Tokenizer.from_gguf_metadata(_modified(md, tokens=tokens))
    tokens = list(md["tokenizer.ggml.tokens"])
    tokens[5] = tokens[6]
    with pytest.raises(DS4Error, match="appears twice"):
        Tokenizer.from_gguf_metadata(_modified(md, tokens=tokens))
    merges = list(md["tokenizer.ggml.merges"]) + ["nonexistent_a nonexistent_b"]
    with pytest.raises(DS4Error, match="merge"):
        Tokenizer.from_gguf_metadata(_modified(md, merges=merges))
    with pytest.raises(DS4Error, match="'A B'"):
        Tokenizer.from_gguf_metadata(_modified(md, merges=["Ġt"]))
    with pytest.raises(DS4Error, match="bos_token_id"):
        Tokenizer.from_gguf_metadata(_modified(md, bos_token_id=5))


def test_metadata_from_bad_json(tmp_path, json_path):
    doc = json.loads(json_path.read_text(encoding="utf-8"))
    doc["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "\\p{N}{1,4}"
    p = tmp_path / "tokenizer.json"
    p.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DS4Error, match="pre-tokenizer"):
        gguf_tokenizer_metadata(p)


def test_bad_text(tok):
    with pytest.raises(DS4Error, match="surrogate"):
        tok.encode("a\ud800b")
    with pytest.raises(DS4Error, match="surrogate"):
        tok.encode_batch(["ok", "a\udcffb"], special=True)
    with pytest.raises(DS4Error, match="expected str"):
        tok.encode(b"bytes")


def test_bad_metadata_byte_tokens_and_merges(md):
    tokens = list(md["tokenizer.ggml.tokens"])
    i = tokens.index("Ġ")
    tokens[i] = "Ġ_renamed"
    with pytest.raises(DS4Error, match="byte 0x20"):
        Tokenizer.from_gguf_metadata(_modified(md, tokens=tokens))
    types = list(md["tokenizer.ggml.token_type"])
    first = md["tokenizer.ggml.merges"][0].replace(" ", "")
    types[md["tokenizer.ggml.tokens"].index(first)] = TOKEN_TYPE_USER_DEFINED
    with pytest.raises(DS4Error, match="produces added token"):
        Tokenizer.from_gguf_metadata(_modified(md, token_type=types))


def test_special_tokens_added_whatever_their_type(md):
    types = list(md["tokenizer.ggml.token_type"])
    types[128821] = TOKEN_TYPE_NORMAL  # <think> stored as normal: still an added token
    t = Tokenizer.from_gguf_metadata(_modified(md, token_type=types))
    assert t.encode("<think>", special=True) == [128821]
    assert 128821 not in t.encode("<think>")
    assert t.is_added(128821)
