"""What every GGUF vocabulary shares, whichever ``tokenizer.ggml.model`` builds it.

llama.cpp's token types, the :class:`_BackendSpec` a builder returns, control and
user-defined tokens as added tokens, and the BOS/EOS post-processor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as _HFTokenizer

from meshpy.errors import CheckpointFormatError

# llama.cpp's token types (gguf: tokenizer.ggml.token_type).
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6


def _byte_token_value(token: str) -> int | None:
    """0..255 for a SentencePiece byte token such as ``<0x0A>``, else None."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return int(token[3:5], 16)
        except ValueError:
            return None
    return None


def _as_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclass
class _BackendSpec:
    backend: _HFTokenizer
    pieces: list[bytes]
    add_bos: bool
    add_eos: bool
    default_bos: int | None
    default_eos: int | None
    strip_leading_space: bool = False


def _required(metadata: Mapping[str, Any], key: str) -> Any:
    if key not in metadata:
        raise CheckpointFormatError(f"GGUF metadata has no {key}")
    return metadata[key]


def _added_tokens(tokens: Sequence[str], types: Sequence[int]) -> list[AddedToken]:
    """Control and unknown tokens as special added tokens, user-defined ones as plain added
    tokens: all matched whole in raw (unnormalized) text."""
    added = []
    for token, kind in zip(tokens, types):
        if kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN):
            added.append(AddedToken(token, special=True, normalized=False))
        elif kind == TOKEN_TYPE_USER_DEFINED:
            added.append(AddedToken(token, special=False, normalized=False))
    return added


def _set_post_processor(backend: _HFTokenizer, tokens: Sequence[str], bos: int | None, eos: int | None) -> None:
    """BOS/EOS around each sequence, as llama.cpp's add_bos/add_eos."""
    if bos is None and eos is None:
        backend.post_processor = None
        return

    def template(seq: str, type_id: int) -> list[str]:
        parts = [f"{tokens[bos]}:{type_id}"] if bos is not None else []
        parts.append(f"${seq}:{type_id}")
        if eos is not None:
            parts.append(f"{tokens[eos]}:{type_id}")
        return parts

    special = sorted({(tokens[i], i) for i in (bos, eos) if i is not None}, key=lambda s: s[1])
    backend.post_processor = processors.TemplateProcessing(
        single=template("A", 0), pair=template("A", 0) + template("B", 1), special_tokens=special
    )


def _check_added_ids(backend: _HFTokenizer, tokens: Sequence[str], added: Sequence[AddedToken]) -> None:
    # Added tokens already in the model's vocabulary keep their ids; anything else would
    # append new ids and shift the vocabulary, so check.
    for tok in added:
        got = backend.token_to_id(tok.content)
        if got is None or tokens[got] != tok.content:
            raise CheckpointFormatError(f"added token {tok.content!r} did not keep its id")
    n = backend.get_vocab_size(with_added_tokens=True)
    if n != len(tokens):
        raise CheckpointFormatError(f"rebuilt vocabulary has {n} tokens, the file {len(tokens)}")
