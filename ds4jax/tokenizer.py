"""DeepSeek V4 tokenizer built from GGUF metadata with the ``tokenizers`` library.

The GGUF stores a GPT-2 style byte-level BPE vocabulary (``tokenizer.ggml.tokens``,
``tokenizer.ggml.token_type``, ``tokenizer.ggml.merges``) plus the *name* of the
pre-tokenizer (``tokenizer.ggml.pre``).  The pre-tokenizer itself is not in the file;
:data:`PRE_TOKENIZERS` maps each supported name to the exact ``tokenizers`` JSON spec
of the official ``tokenizer.json`` (MODEL.md §7.2).  The resulting tokenizer encodes
exactly like ``tokenizers.Tokenizer.from_file(<official tokenizer.json>)``.

Two ``tokenizers`` instances are built from the same vocabulary:

* ``special=True`` — with every added token (token types 3 and 4) registered, so
  added-token strings in the text are matched the way the official file does;
* ``special=False`` — with no added tokens: the text is tokenized literally, so a
  ``<think>`` or ``<｜User｜>`` typed by a user stays ordinary BPE text.  Control tokens
  are only ever produced by the chat template (``ds4jax.chat``).
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from ds4jax.errors import DS4Error

# GGUF token types (llama.cpp's ``llama_token_type``).
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

# Exact special-token strings (MODEL.md §7.3; full-width bar U+FF5C, U+2581).
BOS_TEXT = "<｜begin▁of▁sentence｜>"
EOS_TEXT = "<｜end▁of▁sentence｜>"
USER_TEXT = "<｜User｜>"
ASSISTANT_TEXT = "<｜Assistant｜>"
THINK_START_TEXT = "<think>"
THINK_END_TEXT = "</think>"
DSML_TEXT = "｜DSML｜"

SPECIAL_TEXTS: dict[str, str] = {
    "bos": BOS_TEXT,
    "eos": EOS_TEXT,
    "user": USER_TEXT,
    "assistant": ASSISTANT_TEXT,
    "think_start": THINK_START_TEXT,
    "think_end": THINK_END_TEXT,
    "dsml": DSML_TEXT,
}

_KEY_MODEL = "tokenizer.ggml.model"
_KEY_PRE = "tokenizer.ggml.pre"
_KEY_TOKENS = "tokenizer.ggml.tokens"
_KEY_TYPES = "tokenizer.ggml.token_type"
_KEY_MERGES = "tokenizer.ggml.merges"
_KEY_BOS = "tokenizer.ggml.bos_token_id"
_KEY_EOS = "tokenizer.ggml.eos_token_id"

# ``tokenizers`` JSON specs keyed by ``tokenizer.ggml.pre``.  "joyai-llm" is copied
# from DeepSeek V4's official tokenizer.json (tests check it still equals the file):
# digits in runs of <= 3, CJK/kana runs, then the JoyAI word/punctuation/space regex,
# then byte-level mapping without its own regex.
PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "joyai-llm": {
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": "\\p{N}{1,3}"},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {
                    "type": "Split",
                    "pattern": {"Regex": "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {
                    "type": "Split",
                    "pattern": {
                        "Regex": (
                            "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+"
                            "|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
                            "| ?[\\p{P}\\p{S}]+[\r\n]*"
                            "|\\s*[\r\n]+"
                            "|\\s+(?!\\S)"
                            "|\\s+"
                        )
                    },
                    "behavior": "Isolated",
                    "invert": False,
                },
                {
                    "type": "ByteLevel",
                    "add_prefix_space": False,
                    "trim_offsets": True,
                    "use_regex": False,
                },
            ],
        },
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
    },
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable code point table (MODEL.md §7.1)."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_TO_UNICODE: dict[int, str] = _bytes_to_unicode()
UNICODE_TO_BYTE: dict[str, int] = {c: b for b, c in BYTE_TO_UNICODE.items()}


def _require(md: Mapping[str, Any], key: str) -> Any:
    if key not in md:
        raise DS4Error(f"tokenizer metadata: missing key {key}")
    return md[key]


def _as_str_list(value: Any, key: str) -> list[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise DS4Error(f"tokenizer metadata: {key} is not an array of strings")
    out = []
    for v in value:
        if isinstance(v, bytes):
            v = v.decode("utf-8")
        if not isinstance(v, str):
            raise DS4Error(f"tokenizer metadata: {key} is not an array of strings")
        out.append(v)
    return out


def _as_str(value: Any, key: str) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if not isinstance(value, str):
        raise DS4Error(f"tokenizer metadata: {key} is not a string")
    return value


def _bad_text(text: Any) -> str:
    """Why ``text`` cannot be tokenized ("" when it can)."""
    if not isinstance(text, str):
        return f"cannot tokenize a {type(text).__name__}, expected str"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"text is not valid Unicode (lone surrogate at character {e.start})"
    return ""


class Tokenizer:
    """Byte-level BPE tokenizer of DeepSeek V4 (see module docstring)."""

    def __init__(
        self,
        tokens: Sequence[str],
        token_types: Sequence[int],
        merges: Sequence[str],
        pre: str,
    ):
        tokens = list(tokens)
        token_types = [int(t) for t in token_types]
        if not tokens:
            raise DS4Error("tokenizer metadata: empty tokenizer.ggml.tokens")
        if len(token_types) != len(tokens):
            raise DS4Error(
                f"tokenizer metadata: {len(tokens)} tokens but {len(token_types)} token types"
            )
        spec = PRE_TOKENIZERS.get(pre)
        if spec is None:
            raise DS4Error(f"tokenizer metadata: unknown pre-tokenizer {pre!r} (known: {', '.join(PRE_TOKENIZERS)})")

        vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            j = vocab.setdefault(t, i)
            if j != i:
                raise DS4Error(f"tokenizer metadata: token {t!r} appears twice (ids {j} and {i})")

        special_ids: dict[str, int] = {}
        for role, text in SPECIAL_TEXTS.items():
            tid = vocab.get(text)
            if tid is None:
                raise DS4Error(f"tokenizer metadata: special token {text} ({role}) missing from the vocabulary")
            special_ids[role] = tid

        # Token types 3 (control) and 4 (user-defined) are the added tokens of
        # tokenizer.json; they are matched as whole strings in special=True mode.  The
        # 7 special tokens count as added whatever their stored type.
        added_ids = {i for i, ty in enumerate(token_types) if ty in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)}
        added_ids.update(special_ids.values())

        # BPE starts from single byte-level characters: all 256 must be normal tokens.
        for byte, ch in BYTE_TO_UNICODE.items():
            tid = vocab.get(ch)
            if tid is None or tid in added_ids:
                raise DS4Error(f"tokenizer metadata: no normal token for byte {byte:#04x} ({ch!r})")

        pairs: list[list[str]] = []
        for r, m in enumerate(merges):
            parts = m.split(" ")
            if len(parts) != 2 or not parts[0] or not parts[1]:
                raise DS4Error(f"tokenizer metadata: merge {r} {m!r} is not 'A B'")
            a, b = parts
            ab = vocab.get(a + b)
            if a not in vocab or b not in vocab or ab is None:
                raise DS4Error(f"tokenizer metadata: merge {r} {m!r} uses a token missing from the vocabulary")
            if ab in added_ids:
                raise DS4Error(f"tokenizer metadata: merge {r} {m!r} produces added token {ab}")
            pairs.append(parts)

        added = [
            {
                "id": i,
                "content": tokens[i],
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                # DeepSeek V4 has no normalizer, so normalized/non-normalized matching
                # agree (checked against the official file in the tests).
                "normalized": False,
                "special": token_types[i] != TOKEN_TYPE_USER_DEFINED,
            }
            for i in sorted(added_ids)
        ]

        # Every token, added ones included, is in the BPE vocabulary so ids are the
        # GGUF ids (``tokenizers`` resolves an added token's id from the model vocab
        # when the string is there).  BPE can never produce an added-token string:
        # merges only yield their own (normal) results and ignore_merges is off.
        model = {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": pairs,
        }
        doc = {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": spec["pre_tokenizer"],
            "post_processor": None,
            "decoder": spec["decoder"],
            "model": model,
        }
        try:
            full = _HFTokenizer.from_str(json.dumps(doc, ensure_ascii=False))
            doc["added_tokens"] = []
            plain = _HFTokenizer.from_str(json.dumps(doc, ensure_ascii=False))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise DS4Error(f"tokenizer metadata: cannot build BPE tokenizer: {e}") from e
        for a in added:
            if full.token_to_id(a["content"]) != a["id"]:
                raise DS4Error(f"tokenizer metadata: added token {a['content']!r} did not keep id {a['id']}")

        self._tokens = tokens
        self._types = token_types
        self._vocab = vocab
        self._full = full
        self._plain = plain
        self._pre = pre
        self._bytes_cache: dict[int, bytes] = {}
        self._special_ids = special_ids
        self._added_ids = frozenset(added_ids)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_gguf_metadata(cls, md: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF metadata (``GGUFFile(path).metadata`` or ``gguf_tokenizer_metadata()``)."""
        model = _as_str(_require(md, _KEY_MODEL), _KEY_MODEL)
        if model != "gpt2":
            raise DS4Error(f"tokenizer metadata: {_KEY_MODEL} is {model!r}, expected 'gpt2'")
        pre = _as_str(_require(md, _KEY_PRE), _KEY_PRE)
        tokens = _as_str_list(_require(md, _KEY_TOKENS), _KEY_TOKENS)
        types_raw = _require(md, _KEY_TYPES)
        try:
            types = [int(t) for t in types_raw]
        except (TypeError, ValueError):
            raise DS4Error(f"tokenizer metadata: {_KEY_TYPES} is not an array of integers") from None
        merges = _as_str_list(_require(md, _KEY_MERGES), _KEY_MERGES)
        tok = cls(tokens, types, merges, pre)
        for key, role in ((_KEY_BOS, "bos"), (_KEY_EOS, "eos")):
            if key in md and int(md[key]) != tok._special_ids[role]:
                raise DS4Error(
                    f"tokenizer metadata: {key} = {int(md[key])} but {SPECIAL_TEXTS[role]} is id {tok._special_ids[role]}"
                )
        return tok

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, special: bool = False) -> list[int]:
        """Token ids of ``text``.

        ``special=False``: literal text, added/control token strings are BPE'd as plain
        text.  ``special=True``: added tokens are matched exactly as the official
        tokenizer.json does (``encode(text, add_special_tokens=False)``).
        """
        if not text:
            return []
        hf = self._full if special else self._plain
        try:
            return hf.encode(text, add_special_tokens=False).ids
        except TypeError:
            raise DS4Error(_bad_text(text)) from None

    def encode_batch(self, texts: Sequence[str], special: bool = False) -> list[list[int]]:
        hf = self._full if special else self._plain
        texts = list(texts)
        try:
            return [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
        except TypeError:
            raise DS4Error(next((_bad_text(t) for t in texts if _bad_text(t)), "cannot tokenize text")) from None

    def _check_id(self, tid: int) -> int:
        tid = int(tid)
        if not 0 <= tid < len(self._tokens):
            raise DS4Error(f"token id {tid} out of range [0, {len(self._tokens)})")
        return tid

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (added tokens written literally; invalid UTF-8 -> U+FFFD)."""
        ids = [self._check_id(i) for i in ids]
        return self._full.decode(ids, skip_special_tokens=False)

    def token_bytes(self, tid: int) -> bytes:
        """Raw bytes of one token (added tokens: their literal UTF-8), for streaming."""
        tid = self._check_id(tid)
        b = self._bytes_cache.get(tid)
        if b is None:
            text = self._tokens[tid]
            if tid in self._added_ids:
                b = text.encode("utf-8")
            else:
                try:
                    b = bytes(UNICODE_TO_BYTE[c] for c in text)
                except KeyError:  # not byte-level encoded: raw UTF-8, like the ByteLevel decoder
                    b = text.encode("utf-8")
            self._bytes_cache[tid] = b
        return b

    def token_text(self, tid: int) -> str:
        """The stored vocabulary string of one token (byte-level form for normal tokens)."""
        return self._tokens[self._check_id(tid)]

    def token_to_id(self, text: str) -> int | None:
        """Id of a vocabulary string (byte-level form for normal tokens), or None."""
        return self._vocab.get(text)

    def token_type(self, tid: int) -> int:
        return self._types[self._check_id(tid)]

    def is_added(self, tid: int) -> bool:
        """True for control / user-defined tokens (never produced by BPE)."""
        return self._check_id(tid) in self._added_ids

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    # ------------------------------------------------------------------ properties
    @property
    def n_vocab(self) -> int:
        return len(self._tokens)

    @property
    def pre(self) -> str:
        return self._pre

    @property
    def bos_id(self) -> int:
        return self._special_ids["bos"]

    @property
    def eos_id(self) -> int:
        return self._special_ids["eos"]

    @property
    def user_id(self) -> int:
        return self._special_ids["user"]

    @property
    def assistant_id(self) -> int:
        return self._special_ids["assistant"]

    @property
    def think_start_id(self) -> int:
        return self._special_ids["think_start"]

    @property
    def think_end_id(self) -> int:
        return self._special_ids["think_end"]

    @property
    def dsml_id(self) -> int:
        return self._special_ids["dsml"]

    @property
    def special_ids(self) -> dict[str, int]:
        """Role -> id for the 7 special tokens of MODEL.md §7.3."""
        return dict(self._special_ids)

    @property
    def hf_tokenizer(self) -> _HFTokenizer:
        """The underlying ``tokenizers.Tokenizer`` (added tokens registered)."""
        return self._full

    def __repr__(self) -> str:
        return f"Tokenizer(n_vocab={self.n_vocab}, pre={self._pre!r})"


class StreamDecoder:
    """Incremental detokenizer: feed ids, get text as soon as it is complete UTF-8.

    A multi-byte character split across tokens is held back until its last byte
    arrives; invalid bytes become U+FFFD (same as :meth:`Tokenizer.decode`).
    """

    def __init__(self, tok: Tokenizer):
        self._tok = tok
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: int | Iterable[int]) -> str:
        if isinstance(ids, Iterable):
            data = b"".join(self._tok.token_bytes(i) for i in ids)
        else:
            data = self._tok.token_bytes(ids)
        return self._dec.decode(data, final=False)

    def flush(self) -> str:
        """Text of any held-back incomplete bytes (as U+FFFD); resets the decoder."""
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out

    @property
    def pending(self) -> bool:
        """True when incomplete UTF-8 bytes are held back."""
        return bool(self._dec.getstate()[0])
