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

from tokenizers import Regex, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.models import BPE

from meshpy.errors import CheckpointFormatError
from meshpy.tokenizer.gguf_sentencepiece import escape_spaces
from meshpy.tokenizer.gguf_vocab import _BackendSpec, _required


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
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[^\n]+|\n+"), behavior="isolated")
    pieces = escape_spaces(backend, tokens, types, add_space_prefix)
    # llama.cpp forces add_bos for gemma4 (llama_vocab::impl::load); its ids come from the file.
    return _BackendSpec(
        backend, pieces, add_bos=True, add_eos=False, default_bos=None, default_eos=None,
        strip_leading_space=add_space_prefix,
    )
