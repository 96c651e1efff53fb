"""Byte-level BPE from GGUF metadata (``tokenizer.ggml.model == "gpt2"``).

The pre-tokenizer regexes llama.cpp picks for each ``tokenizer.ggml.pre``, GPT-2's byte <->
printable character table, and :func:`_build_byte_level_bpe`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenizers import Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.models import BPE

from meshpy.errors import CheckpointFormatError
from meshpy.tokenizer.gguf_vocab import (
    TOKEN_TYPE_BYTE,
    TOKEN_TYPE_CONTROL,
    TOKEN_TYPE_UNKNOWN,
    TOKEN_TYPE_UNUSED,
    TOKEN_TYPE_USER_DEFINED,
    _added_tokens,
    _as_str,
    _BackendSpec,
    _byte_token_value,
    _check_added_ids,
    _required,
)

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Pre-tokenizer regexes for byte-level BPE, from llama.cpp src/llama-vocab.cpp
# (llm_tokenizer_bpe's constructor). Each list is applied in order: every regex splits the
# pieces left by the one before, keeping both matches and the text between them.
# ---------------------------------------------------------------------------------------------

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"

# llama.cpp spells the (?i:...) contractions of the original tokenizer.json as explicit case
# pairs; we keep its spelling.
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _PreTokenizer:
    """How llama.cpp splits text before byte-level BPE for one family of ``tokenizer.ggml.pre``."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a word that is itself a token is not merged (llama3)
    add_bos: bool = False  # llama.cpp's default for add_bos_token when the file has no key


_PRE_DEFAULT = _PreTokenizer(
    (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
)
_PRE_GPT2 = _PreTokenizer((_GPT2,))
_PRE_SMOLLM = _PreTokenizer((r"\p{N}", _GPT2))
_PRE_LLAMA3 = _PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)
_PRE_LLAMA3_REGEX_ONLY = _PreTokenizer((_LLAMA3,))
_PRE_QWEN2 = _PreTokenizer((_QWEN2,))

# tokenizer.ggml.pre -> pre-tokenizer, as llama.cpp's llama_vocab::impl::load maps them.
_GGUF_PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    "default": _PRE_DEFAULT,
    **{name: _PRE_GPT2 for name in (
        "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
        "a.x-4.0", "mellum", "modern-bert", "mpt", "olmo", "jais", "trillion",
        "granite-docling", "exaone4",
    )},
    **{name: _PRE_SMOLLM for name in (
        "smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b",
        "mellum2",
    )},
    **{name: _PRE_LLAMA3 for name in (
        "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
        "lfm2", "jina-v5-nano",
    )},
    **{name: _PRE_LLAMA3_REGEX_ONLY for name in ("dbrx", "smaug-bpe")},
    **{name: _PRE_QWEN2 for name in (
        "qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2",
    )},
}


def known_gguf_pre_tokenizers() -> list[str]:
    """The ``tokenizer.ggml.pre`` values a byte-level GGUF vocabulary may have here."""
    return sorted(_GGUF_PRE_TOKENIZERS)


# GPT-2's byte <-> printable character table (what byte-level BPE vocabularies are spelled in).
def _bytes_to_unicode() -> dict[int, str]:
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table: dict[int, str] = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _byte_level_piece(token: str) -> bytes:
    """The bytes a byte-level BPE token stands for (llama.cpp's ``llama_decode_text``)."""
    out = bytearray()
    for ch in token:
        b = _CHAR_TO_BYTE.get(ch)
        if b is None:  # not in the byte alphabet: llama.cpp writes [UNK_BYTE_...]; keep raw
            out += ch.encode("utf-8")
        else:
            out.append(b)
    return bytes(out)


def _build_byte_level_bpe(metadata: Mapping[str, Any], tokens: list[str], types: list[int]) -> _BackendSpec:
    pre_name = _as_str(metadata.get("tokenizer.ggml.pre") or "default")
    pre = _GGUF_PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        raise CheckpointFormatError(
            f"unknown tokenizer.ggml.pre {pre_name!r} for a byte-level BPE vocabulary; known: "
            + ", ".join(known_gguf_pre_tokenizers())
        )
    vocab = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[str, str]] = []
    dropped = 0
    for m in _required(metadata, "tokenizer.ggml.merges"):
        m = _as_str(m)
        pos = m.find(" ", 1)  # as llama.cpp: the first space after the first character
        if pos < 0:
            dropped += 1
            continue
        a, b = m[:pos], m[pos + 1 :]
        # tokenizers needs both halves and the result in the vocabulary; llama.cpp would merge
        # and then fall back to bytes, which no real vocabulary relies on.
        if a in vocab and b in vocab and a + b in vocab:
            merges.append((a, b))
        else:
            dropped += 1
    if dropped:
        logger.warning("dropped %d merges whose tokens are not in the vocabulary", dropped)

    backend = _HFTokenizer(BPE(vocab=vocab, merges=merges, ignore_merges=pre.ignore_merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    added = _added_tokens(tokens, types)
    backend.add_tokens(added)
    _check_added_ids(backend, tokens, added)

    pieces = []
    for token, kind in zip(tokens, types):
        if kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED, TOKEN_TYPE_UNKNOWN):
            pieces.append(token.encode("utf-8"))
        elif kind == TOKEN_TYPE_BYTE:
            value = _byte_token_value(token)
            pieces.append(bytes([value]) if value is not None else _byte_level_piece(token))
        elif kind == TOKEN_TYPE_UNUSED:
            pieces.append(b"")
        else:
            pieces.append(_byte_level_piece(token))
    # llama.cpp's defaults for a BPE vocabulary: BOS = EOS = 11 (overridden by the file).
    return _BackendSpec(backend, pieces, add_bos=pre.add_bos, add_eos=False, default_bos=11, default_eos=11)
