"""SentencePiece-style vocabularies from GGUF metadata (``tokenizer.ggml.model == "llama"``).

:func:`_build_sentencepiece_bpe` rebuilds llama.cpp's SPM tokenizer as a BPE model whose
merges are every split of every token into two tokens, ranked by the merged token's score.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenizers import decoders, normalizers
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
    _BackendSpec,
    _byte_token_value,
    _check_added_ids,
)

_SPACE_MARK = "\u2581"  # "▁", SentencePiece's escaped space


def _build_sentencepiece_bpe(metadata: Mapping[str, Any], tokens: list[str], types: list[int]) -> _BackendSpec:
    n = len(tokens)
    scores = metadata.get("tokenizer.ggml.scores")
    scores = [float(s) for s in scores] if scores is not None else [0.0] * n
    if len(scores) < n:
        raise CheckpointFormatError(f"tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
    vocab = {t: i for i, t in enumerate(tokens)}

    # llama.cpp merges the adjacent pair whose concatenation is the best-scoring token (ties:
    # leftmost). As BPE merges: every split of every token into two tokens, ranked by the
    # merged token's score (then id, which keeps each token's splits together).
    candidates: list[tuple[float, int, str, str]] = []
    for i, token in enumerate(tokens):
        if len(token) < 2:
            continue
        for k in range(1, len(token)):
            a, b = token[:k], token[k:]
            if a in vocab and b in vocab:
                candidates.append((-scores[i], i, a, b))
    candidates.sort(key=lambda c: (c[0], c[1]))
    merges = [(a, b) for _, _, a, b in candidates]

    unk_id = metadata.get("tokenizer.ggml.unknown_token_id", 0)
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < n else None
    backend = _HFTokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = None
    pieces = escape_spaces(backend, tokens, types, add_space_prefix)
    # llama.cpp's defaults for an SPM vocabulary: BOS 1, EOS 2, add BOS, no EOS.
    return _BackendSpec(
        backend, pieces, add_bos=True, add_eos=False, default_bos=1, default_eos=2,
        strip_leading_space=add_space_prefix,
    )


def escape_spaces(backend: _HFTokenizer, tokens: list[str], types: list[int], add_space_prefix: bool) -> list[bytes]:
    """The parts SentencePiece-style vocabularies share (this one and Gemma 4's): spaces
    escaped to "▁" (and one prepended with `add_space_prefix`) and back, `<0xXX>` byte
    tokens fused into text, the control / user-defined / unknown tokens matched whole in raw
    text. Returns each token's bytes for detokenizing."""
    norm: list[Any] = [normalizers.Prepend(_SPACE_MARK)] if add_space_prefix else []
    norm.append(normalizers.Replace(" ", _SPACE_MARK))
    backend.normalizer = normalizers.Sequence(norm)
    dec: list[Any] = [decoders.Replace(_SPACE_MARK, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(dec)
    added = _added_tokens(tokens, types)
    backend.add_tokens(added)
    _check_added_ids(backend, tokens, added)
    pieces = []
    for token, kind in zip(tokens, types):
        if kind == TOKEN_TYPE_BYTE:
            value = _byte_token_value(token)
            pieces.append(bytes([value]) if value is not None else token.encode("utf-8"))
        elif kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED, TOKEN_TYPE_UNKNOWN):
            pieces.append(token.encode("utf-8"))
        elif kind == TOKEN_TYPE_UNUSED:
            pieces.append(b"")
        else:
            pieces.append(token.replace(_SPACE_MARK, " ").encode("utf-8"))
    return pieces
