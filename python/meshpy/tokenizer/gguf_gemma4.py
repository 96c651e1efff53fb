"""Gemma 4's vocabulary from GGUF metadata (``tokenizer.ggml.model == "gemma4"``), as
llama.cpp reads it (src/llama-vocab.cpp: the "gemma4" tokenizer model and pre-tokenizer):

- a BPE over raw UTF-8 characters (not GPT-2's byte encoding) with the file's merges, ranked
  in order (`tokenizer.ggml.merges`, "a b" each);
- spaces escaped to "▁" first (no space prefix unless `add_space_prefix` says so);
- the text split into runs of non-newlines and runs of newlines; a newline run that is a token
  is that token whole (llama.cpp's fix for Gemma 4, ggml-org/llama.cpp#21343), else merged as
  any run. Here every run that is a token is taken whole (the BPE's `ignore_merges`): for a
  line of text that is itself a token, merging its characters gives that token too;
- a piece that is no token falls back to its bytes' `<0xXX>` tokens;
- BOS always added.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenizers import Regex, decoders, normalizers, pre_tokenizers
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
    _required,
)

_SPACE_MARK = "\u2581"  # "▁"


def _build_gemma4_bpe(metadata: Mapping[str, Any], tokens: list[str], types: list[int]) -> _BackendSpec:
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for entry in _required(metadata, "tokenizer.ggml.merges"):
        text = entry.decode("utf-8") if isinstance(entry, bytes) else str(entry)
        cut = text.find(" ", 1)  # as llama.cpp: the first space after the first character
        if cut < 0:
            raise CheckpointFormatError(f"tokenizer.ggml.merges entry {text!r} has no space")
        merges.append((text[:cut], text[cut + 1 :]))
    backend = _HFTokenizer(BPE(vocab=vocab, merges=merges, byte_fallback=True, ignore_merges=True))
    add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", False))
    norm: list[Any] = [normalizers.Prepend(_SPACE_MARK)] if add_space_prefix else []
    norm.append(normalizers.Replace(" ", _SPACE_MARK))
    backend.normalizer = normalizers.Sequence(norm)
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[^\n]+|\n+"), behavior="isolated")
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
    # llama.cpp forces add_bos for gemma4 (llama_vocab::impl::load); its ids come from the file.
    return _BackendSpec(
        backend, pieces, add_bos=True, add_eos=False, default_bos=None, default_eos=None,
        strip_leading_space=add_space_prefix,
    )
