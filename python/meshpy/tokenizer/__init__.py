"""Text <-> token ids for the End model.

A :class:`Tokenizer` wraps a Hugging Face ``tokenizers.Tokenizer`` (the Rust library, no
transformers) built one of two ways:

* from GGUF metadata (``tokenizer.ggml.*``), rebuilt so that it gives the same ids as
  llama.cpp's own tokenizer for that file (``llama_tokenize(..., parse_special=true)``):

  - ``tokenizer.ggml.model == "gpt2"``: byte-level BPE. The vocabulary and merges come from
    the file; the pre-tokenizer is the regex list llama.cpp picks for ``tokenizer.ggml.pre``
    (src/llama-vocab.cpp, ``llm_tokenizer_bpe``), each regex a ``Split(..., "isolated")``
    followed by ``ByteLevel(use_regex=False)``.
  - ``tokenizer.ggml.model == "llama"``: SentencePiece-style, as llama.cpp's SPM tokenizer
    does it: spaces become "▁", the text is merged greedily by token score (the best-scoring
    pair whose concatenation is a token first), characters that never became a token fall
    back to ``<0xXX>`` byte tokens. That is a BPE model whose merges are every split of every
    token into two tokens, ranked by the merged token's score.

  Control, user-defined and unknown tokens (``token_type`` 3, 4, 2) are added tokens, matched
  whole in the input before anything else, as llama.cpp does with ``parse_special=true``.
* from a checkpoint directory's ``tokenizer.json`` (+ ``tokenizer_config.json`` and
  ``generation_config.json`` for the special tokens), used as it is.

Decoding of a GGUF vocabulary follows llama.cpp's ``token_to_piece``: every id maps to a byte
string, and the concatenation is decoded as UTF-8 with U+FFFD for invalid bytes. No
"clean up tokenization spaces" pass is applied: ``decode(encode(text)) == text``.

The package, one module per concept:

* :mod:`.tokenizer`: :class:`Tokenizer`, its constructors and the special (BOS, EOS, stop)
  token logic.
* :mod:`.incremental_decoder`: :class:`IncrementalDecoder`, text from a stream of ids.
* :mod:`.gguf_vocab`: what both GGUF vocabulary builders share (token types, added tokens,
  the BOS/EOS post-processor).
* :mod:`.gguf_byte_level`: ``tokenizer.ggml.model == "gpt2"`` and llama.cpp's pre-tokenizers.
* :mod:`.gguf_sentencepiece`: ``tokenizer.ggml.model == "llama"``.
"""

from meshpy.tokenizer.gguf_byte_level import known_gguf_pre_tokenizers
from meshpy.tokenizer.incremental_decoder import IncrementalDecoder
from meshpy.tokenizer.tokenizer import Tokenizer

__all__ = ["Tokenizer", "IncrementalDecoder", "known_gguf_pre_tokenizers"]
