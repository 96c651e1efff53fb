"""Structured output: constrained decoding of OpenAI's ``response_format`` with llguidance.

A :class:`Grammar` is a JSON schema compiled for one tokenizer; :meth:`Grammar.start` gives a
:class:`Matcher` per generation, which says which tokens may come next (:meth:`Matcher.allowed`,
:meth:`Matcher.mask_logits`) and follows the sampled ones (:meth:`Matcher.accept`). The parser
and token masks are llguidance's (github.com/guidance-ai/llguidance); this module only
translates the request, builds llguidance's view of the vocabulary and keeps both cached.

The tokenizer's stop ids are llguidance's EOS set: they are allowed exactly when the grammar
may end here (the text so far is complete), and are the only tokens allowed once it must
(:attr:`Matcher.done`).
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np

from meshpy.errors import MeshpyError
from meshpy.tokenizer import Tokenizer

__all__ = ["ConstraintError", "Grammar", "Matcher", "json_rule"]

logger = logging.getLogger(__name__)

# How llguidance writes JSON: no free whitespace (a small model would otherwise spend its
# tokens on newlines and indentation, or never leave them), ", " and ": " between items as
# json.dumps writes them. A schema's own "x-guidance" options override these.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# Compiled grammars kept per tokenizer (by schema), least recently used dropped first.
_GRAMMARS_PER_TOKENIZER = 64

_RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")


class ConstraintError(MeshpyError, ValueError):
    """A ``response_format`` or JSON schema that cannot be compiled (the message says why),
    or a token that the constraint does not allow."""


class Grammar:
    """A compiled constraint for one tokenizer; shareable across generations (thread-safe to
    start matchers from).

    Build one with :meth:`from_response_format` or :meth:`from_json_schema`; both keep the
    grammars they compile (per tokenizer, by schema), so asking again is cheap.
    """

    def __init__(self, vocabulary: _Vocabulary, matcher: llguidance.LLMatcher, schema: Mapping[str, Any]) -> None:
        """Prefer the ``from_*`` constructors. ``matcher`` is a fresh llguidance matcher
        that :meth:`start` copies."""
        self._vocabulary = vocabulary
        self._pristine = matcher
        self._lock = threading.Lock()
        self.schema = schema

    @classmethod
    def from_response_format(cls, response_format: Mapping[str, Any], tokenizer: Tokenizer) -> Grammar | None:
        """The grammar an OpenAI ``response_format`` asks for, or None for plain text.

        ``{"type": "text"}`` is None; ``{"type": "json_object"}`` is any JSON object;
        ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``
        is that schema (enforced whether or not ``strict`` is set). Raises
        :class:`ConstraintError` naming the field that is wrong, or saying why the schema
        does not compile.
        """
        if not isinstance(response_format, Mapping):
            raise ConstraintError(f"response_format must be an object, got {_json_type(response_format)}")
        kind = response_format.get("type")
        if kind not in _RESPONSE_FORMAT_TYPES:
            raise ConstraintError(
                f"response_format.type must be one of {', '.join(map(repr, _RESPONSE_FORMAT_TYPES))}, got {kind!r}"
            )
        if kind == "text":
            return None
        if kind == "json_object":
            return cls.from_json_schema({"type": "object"}, tokenizer)
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping):
            raise ConstraintError(
                "response_format.json_schema must be an object with 'name' and 'schema', "
                f"got {_json_type(spec)}"
            )
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise ConstraintError(f"response_format.json_schema.name must be a non-empty string, got {name!r}")
        if "description" in spec and not isinstance(spec["description"], str):
            raise ConstraintError("response_format.json_schema.description must be a string")
        if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
            raise ConstraintError(f"response_format.json_schema.strict must be a boolean, got {spec['strict']!r}")
        schema = spec.get("schema")
        if not isinstance(schema, Mapping):
            raise ConstraintError(
                f"response_format.json_schema.schema must be a JSON Schema object, got {_json_type(schema)}"
            )
        return cls.from_json_schema(schema, tokenizer)

    @classmethod
    def from_json_schema(cls, schema: Mapping[str, Any], tokenizer: Tokenizer) -> Grammar:
        """The grammar of JSON values that validate against ``schema``; raises
        :class:`ConstraintError` when llguidance rejects the schema (the message is its
        reason: an unknown keyword or format, a bad ``$ref`` or pattern, an unsatisfiable
        combination)."""
        return _vocabulary(tokenizer).grammar(schema)

    @classmethod
    def from_lark(cls, lark: str, tokenizer: Tokenizer) -> Grammar:
        """The grammar of a Lark text in llguidance's dialect (`json_rule` writes a rule for
        JSON valid against a schema, laid out as JSON schemas here are); raises
        :class:`ConstraintError` when it does not compile."""
        try:
            text = llguidance.LLMatcher.grammar_from_lark(lark)
        except ValueError as e:
            raise ConstraintError(f"the grammar does not compile: {e}") from e
        return _vocabulary(tokenizer).compiled("lark:" + lark, text, {"lark": lark})

    def start(self) -> Matcher:
        """A matcher at the start of a generation."""
        with self._lock:  # llguidance matchers are not meant to be shared between threads
            matcher = self._pristine.deep_copy()
        return Matcher(self._vocabulary, matcher)

    def __repr__(self) -> str:
        return f"Grammar(schema={json.dumps(self.schema)[:200]})"


class Matcher:
    """One generation's state: which tokens may come next. Use it from one thread at a time.

    Per step: :meth:`mask_logits` (or :meth:`allowed`), sample, :meth:`accept`; stop when
    :attr:`done` or when a stop id was sampled.
    """

    def __init__(self, vocabulary: _Vocabulary, matcher: llguidance.LLMatcher) -> None:
        """Prefer :meth:`Grammar.start`."""
        self._vocabulary = vocabulary
        self._matcher = matcher
        self._bits: np.ndarray | None = None  # this step's mask, one bool per token

    def allowed(self, n_columns: int) -> np.ndarray:
        """Bool mask of length ``n_columns`` (a logits row; columns past the vocabulary are
        False): True where the token may come next. Stop ids are True exactly when the
        grammar may end here."""
        allowed = np.zeros(n_columns, dtype=bool)
        bits = self._unpacked()
        n = min(n_columns, bits.size)
        allowed[:n] = bits[:n]
        return allowed

    def mask_logits(self, logits: np.ndarray) -> None:
        """Sets ``logits`` (one row, float32) to -inf in place where :meth:`allowed` is False."""
        if logits.ndim != 1:
            raise ValueError(f"mask_logits takes one row of logits, got shape {logits.shape}")
        bits = self._unpacked()
        n = min(logits.size, bits.size)
        np.copyto(logits[:n], -np.inf, where=~bits[:n])
        logits[n:] = -np.inf

    def accept(self, token: int) -> None:
        """Advances past ``token``; raises :class:`ConstraintError` when it was not allowed
        (the matcher then allows only the stop ids)."""
        token = int(token)
        if not 0 <= token < self._vocabulary.size:
            raise ConstraintError(f"token {token} is outside the vocabulary (size {self._vocabulary.size})")
        self._bits = None
        if not self._matcher.consume_token(token):
            # The first line says which token and byte; the rest is llguidance's parser dump.
            reason = self._matcher.get_error().splitlines()
            raise ConstraintError(f"token {token} does not fit the response format: {reason[0] if reason else ''}")

    def rollback(self, n_tokens: int) -> None:
        """Undoes the last ``n_tokens`` accepted (a speculative draft's rejected tail)."""
        self._bits = None
        if n_tokens > 0 and not self._matcher.rollback(int(n_tokens)):
            raise ConstraintError(f"cannot roll back {n_tokens} tokens")

    @property
    def done(self) -> bool:
        """The grammar is complete and cannot grow: only a stop id may follow (the
        generation should stop). Also true after :meth:`accept` refused a token."""
        return self._matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        """The text so far is complete (a stop id may come next), though it might grow."""
        return self._matcher.is_accepting()

    def _unpacked(self) -> np.ndarray:
        """This step's mask as one bool per token of the vocabulary (computed once a step)."""
        if self._bits is None:
            vocabulary = self._vocabulary
            words = llg_numpy.allocate_token_bitmask(1, vocabulary.size)
            llg_numpy.fill_next_token_bitmask(self._matcher, words)
            # Token t is bit t % 32 of word t // 32, the words little-endian.
            bits = np.unpackbits(words.view(np.uint8), bitorder="little", count=vocabulary.size).view(bool)
            # llguidance allows its EOS set where the grammar may end; make that exactly the
            # stop ids (the same set, unless it read the tokenizer's EOS differently).
            if vocabulary.stop_ids.size:
                bits[vocabulary.stop_ids] = bits[vocabulary.eos]
            self._bits = bits
        return self._bits


class _Vocabulary:
    """llguidance's view of one tokenizer (expensive: built once per tokenizer) and the
    grammars compiled for it."""

    def __init__(self, tokenizer: Tokenizer, lltokenizer: llguidance.LLTokenizer | None = None) -> None:
        stop_ids = sorted(tokenizer.stop_ids)
        self.lltokenizer = lltokenizer if lltokenizer is not None else _lltokenizer(tokenizer, stop_ids)
        self.size = self.lltokenizer.vocab_size
        self.eos = self.lltokenizer.eos_token
        self.stop_ids = np.array([i for i in stop_ids if i < self.size], dtype=np.intp)
        self._grammars: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()

    def grammar(self, schema: Mapping[str, Any]) -> Grammar:
        """``schema`` compiled, or taken from the grammars kept (see
        :meth:`Grammar.from_json_schema`)."""
        try:
            # Not sorted: the output's properties come in the schema's order.
            key = json.dumps(schema, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ConstraintError(f"the JSON schema is not JSON: {e}") from e
        with self._lock:
            grammar = self._grammars.get(key)
            if grammar is not None:
                self._grammars.move_to_end(key)
                return grammar
        try:
            text = llguidance.LLMatcher.grammar_from_json_schema(key, defaults=_JSON_OPTIONS)
        except ValueError as e:
            raise ConstraintError(f"the JSON schema does not compile: {e}") from e
        return self.compiled(key, text, json.loads(key))

    def compiled(self, key: str, text: str, schema: Mapping[str, Any]) -> Grammar:
        """The grammar `text` (llguidance's serialized form) compiled for this tokenizer and
        kept under `key`, or the one kept there."""
        with self._lock:
            grammar = self._grammars.get(key)
            if grammar is not None:
                self._grammars.move_to_end(key)
                return grammar
        # Compiles the grammar (llguidance releases the GIL meanwhile); errors are reported by
        # the matcher, not raised.
        matcher = llguidance.LLMatcher(self.lltokenizer, text, log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"the grammar does not compile: {matcher.get_error()}")
        for warning in matcher.get_grammar_warnings():
            logger.info("grammar: %s", warning)
        grammar = Grammar(self, matcher, schema)
        with self._lock:
            self._grammars[key] = grammar
            self._grammars.move_to_end(key)
            while len(self._grammars) > _GRAMMARS_PER_TOKENIZER:
                self._grammars.popitem(last=False)
        return grammar


def json_rule(schema: Mapping[str, Any]) -> str:
    """A Lark rule body (for `Grammar.from_lark`) matching JSON valid against `schema`, laid
    out as `Grammar.from_json_schema` lays it out."""
    return "%json " + json.dumps({"x-guidance": _JSON_OPTIONS, **schema})


_vocabularies: weakref.WeakKeyDictionary[Tokenizer, _Vocabulary] = weakref.WeakKeyDictionary()
_vocabularies_lock = threading.Lock()


def _vocabulary(tokenizer: Tokenizer) -> _Vocabulary:
    """The tokenizer's :class:`_Vocabulary`, built on first use and kept while it lives."""
    with _vocabularies_lock:
        vocabulary = _vocabularies.get(tokenizer)
        if vocabulary is None:
            vocabulary = _vocabularies[tokenizer] = _Vocabulary(tokenizer)
        return vocabulary


def _lltokenizer(tokenizer: Tokenizer, stop_ids: list[int]) -> llguidance.LLTokenizer:
    """llguidance's tokenizer for ``tokenizer``, the stop ids as its EOS set.

    First from the backend's ``tokenizer.json`` (llguidance reads the byte of every token
    itself, which is exact where meshpy keeps only a token's text); kept when every token's
    bytes agree with :meth:`Tokenizer.token_bytes`, else built from those bytes.
    """
    n = tokenizer.vocab_size
    eos: list[int] | None = stop_ids or None
    try:
        lltokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=n, eos_token=eos)
    except ValueError as e:
        logger.info("llguidance cannot read this tokenizer.json (%s); building it from token bytes", e)
    else:
        disagree = _disagreeing_ids(lltokenizer, tokenizer)
        if not disagree:
            return lltokenizer
        i = disagree[0]
        logger.info(
            "llguidance reads %d tokens differently from the tokenizer (id %d: %r, not %r); "
            "building it from token bytes",
            len(disagree), i, lltokenizer.decode_bytes([i]), tokenizer.token_bytes(i),
        )
    return _lltokenizer_from_bytes(tokenizer, eos)


def _lltokenizer_from_bytes(tokenizer: Tokenizer, eos: list[int] | None) -> llguidance.LLTokenizer:
    """llguidance's tokenizer built from :meth:`Tokenizer.token_bytes` of every id."""
    return llguidance.LLTokenizer(
        llguidance.TokenizerWrapper(_TokenBytes(tokenizer)), n_vocab=tokenizer.vocab_size, eos_token=eos
    )


def _disagreeing_ids(lltokenizer: llguidance.LLTokenizer, tokenizer: Tokenizer) -> list[int]:
    """Ids whose bytes llguidance and the tokenizer see differently.

    They agree where the tokenizer keeps only a token's text (no byte table) and llguidance's
    bytes decode to that text; and on the byte 0xFF, which llguidance reserves to mark
    special tokens and no UTF-8 text holds (it reads the token as empty).
    """
    out = []
    for i in range(tokenizer.vocab_size):
        ours = tokenizer.token_bytes(i)
        theirs = lltokenizer.decode_bytes([i])
        if theirs == ours or (ours == b"\xff" and theirs == b""):
            continue
        if theirs.decode("utf-8", errors="replace").encode("utf-8") == ours:
            continue
        out.append(i)
    return out


class _TokenBytes:
    """What ``llguidance.TokenizerWrapper`` reads: every token's bytes, EOS, BOS, the
    special ids, and the tokenizer itself as a text -> ids callable."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        special = {i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special}
        # llguidance marks special tokens with a leading 0xFF itself; a plain token holding
        # that byte would read as a marker, so it is left empty (never allowed).
        self.tokens = [
            b"" if (b := tokenizer.token_bytes(i)).startswith(b"\xff") and i not in special else b
            for i in range(tokenizer.vocab_size)
        ]
        self.special_token_ids = sorted(special)
        self.bos_token_id = tokenizer.bos_id
        self.eos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else min(tokenizer.stop_ids, default=None)
        # The backend, not the Tokenizer: the cache of vocabularies holds this weakly keyed
        # by the Tokenizer, which must not be kept alive from here.
        self._backend = tokenizer.backend

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return self._backend.encode(text, add_special_tokens=False).ids


def _json_type(value: object) -> str:
    """A value's kind as a JSON reader would name it, for error messages."""
    if value is None:
        return "null or nothing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__
