"""Text from a stream of token ids, as it comes (:class:`IncrementalDecoder`)."""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the Tokenizer module imports this one
    from meshpy.tokenizer.tokenizer import Tokenizer

__all__ = ["IncrementalDecoder"]


class IncrementalDecoder:
    """Turns a stream of token ids into text as it comes.

    :meth:`add` returns the text that became final with this token; it is ``""`` while a
    multi-byte UTF-8 character (split over byte-level or ``<0xXX>`` tokens) is incomplete.
    :meth:`flush` returns what is left. The pieces put together equal
    ``tokenizer.decode(all_ids, skip_special_tokens)``.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False) -> None:
        """Start an empty stream over ``tokenizer``."""
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._emitted = 0  # characters of decode(all ids) handed out so far
        # Tokenizers with a piece table decode byte-exactly: feed bytes to a UTF-8 decoder.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = False
        # Otherwise: re-decode a window of ids (vLLM's prefix/read offsets).
        self._prefix = 0
        self._read = 0

    def add(self, token_id: int) -> str:
        """Add one token id; return the newly completed text (maybe ``""``)."""
        tok = self._tokenizer
        (token_id,) = tok._check_ids([token_id])
        if tok._pieces is not None:
            if self._skip and token_id in tok._special_ids:
                return ""
            text = self._utf8.decode(tok._pieces[token_id])
            return self._strip_first(text)
        self._ids.append(token_id)
        prefix_text = tok.decode(self._ids[self._prefix : self._read], self._skip)
        new_text = tok.decode(self._ids[self._prefix :], self._skip)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Return any text still held back (an incomplete character decodes as U+FFFD)."""
        tok = self._tokenizer
        if tok._pieces is not None:
            return self._strip_first(self._utf8.decode(b"", final=True))
        prefix_text = tok.decode(self._ids[self._prefix : self._read], self._skip)
        new_text = tok.decode(self._ids[self._prefix :], self._skip)
        self._prefix, self._read = self._read, len(self._ids)
        return new_text[len(prefix_text) :]

    def _strip_first(self, text: str) -> str:
        # SentencePiece with add_space_prefix: the first character of the text, if a space,
        # is the prefix the encoder added.
        if not self._started and text:
            self._started = True
            if self._tokenizer._strip_leading_space and text.startswith(" "):
                return text[1:]
        return text
