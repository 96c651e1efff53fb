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
"""

from __future__ import annotations

import codecs
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.models import BPE

from meshpy.errors import CheckpointFormatError, InvalidArgumentError

__all__ = ["Tokenizer", "IncrementalDecoder", "known_gguf_pre_tokenizers"]

logger = logging.getLogger(__name__)

# llama.cpp's token types (gguf: tokenizer.ggml.token_type).
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

_SPACE_MARK = "\u2581"  # "▁", SentencePiece's escaped space

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


# Tokens that end generation, by text (llama.cpp's list of end-of-generation tokens).
_END_OF_GENERATION_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
    "<|endoftext|>", "<|eom_id|>", "<EOT>", "<|end_of_text|>", "<end_of_utterance>",
)


def _end_of_generation_ids(token_to_id: Mapping[str, int]) -> set[int]:
    ids = {token_to_id[t] for t in _END_OF_GENERATION_TEXTS if t in token_to_id}
    # gpt-oss (harmony): "<|end|>" ends a message, not the generation, when these exist.
    if "<|return|>" in token_to_id and "<|call|>" in token_to_id and "<|end|>" in token_to_id:
        ids.discard(token_to_id["<|end|>"])
    return ids


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


def _byte_token_value(token: str) -> int | None:
    """0..255 for a SentencePiece byte token such as ``<0x0A>``, else None."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return int(token[3:5], 16)
        except ValueError:
            return None
    return None


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or {"content": ...}."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise CheckpointFormatError(f"special token must be a string or {{'content': str}}, got {value!r}")


def _as_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class Tokenizer:
    """Encodes text to token ids and decodes ids to text, as the model's own tokenizer does.

    Build one with :meth:`from_gguf_metadata`, :meth:`from_hf_files` or :meth:`from_hf_dir`.
    """

    def __init__(
        self,
        backend: _HFTokenizer,
        *,
        bos_id: int | None,
        eos_id: int | None,
        stop_ids: Iterable[int],
        pieces: Sequence[bytes] | None = None,
        special_ids: Iterable[int] = (),
        strip_leading_space: bool = False,
    ) -> None:
        """Wrap ``backend``; prefer the ``from_*`` constructors.

        ``pieces`` (one byte string per id), ``special_ids`` and ``strip_leading_space`` give a
        llama.cpp-style decoder; without them decoding is the backend's.
        """
        self._backend = backend
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._bos_id = bos_id
        self._eos_id = eos_id
        self._stop_ids = frozenset(i for i in stop_ids if 0 <= i < self._vocab_size)
        self._pieces = list(pieces) if pieces is not None else None
        if self._pieces is not None and len(self._pieces) != self._vocab_size:
            raise CheckpointFormatError(
                f"{len(self._pieces)} decode pieces for a vocabulary of {self._vocab_size}"
            )
        self._special_ids = frozenset(special_ids)
        self._strip_leading_space = strip_leading_space

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build the tokenizer a GGUF file describes from its ``tokenizer.ggml.*`` metadata.

        ``metadata`` maps GGUF keys to Python values (arrays as lists). Raises
        :class:`~meshpy.errors.CheckpointFormatError` for missing or inconsistent keys and for a
        tokenizer model or pre-tokenizer this module does not know.
        """
        model = _as_str(metadata.get("tokenizer.ggml.model", ""))
        tokens = [_as_str(t) for t in _required(metadata, "tokenizer.ggml.tokens")]
        if not tokens:
            raise CheckpointFormatError("tokenizer.ggml.tokens is empty")
        n = len(tokens)
        raw_types = metadata.get("tokenizer.ggml.token_type")
        types = [TOKEN_TYPE_NORMAL] * n if raw_types is None else list(raw_types)
        if len(types) < n:
            raise CheckpointFormatError(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
        types = [int(t) for t in types[:n]]
        token_to_id: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if t in token_to_id:
                raise CheckpointFormatError(f"duplicate token {t!r} at ids {token_to_id[t]} and {i}")
            token_to_id[t] = i

        if model == "gpt2":
            spec = _build_byte_level_bpe(metadata, tokens, types)
        elif model == "llama":
            spec = _build_sentencepiece_bpe(metadata, tokens, types)
        else:
            raise CheckpointFormatError(
                f"unsupported tokenizer.ggml.model {model!r}; supported: 'gpt2' (byte-level BPE), "
                "'llama' (SentencePiece)"
            )

        def special_id(key: str, default: int | None) -> int | None:
            value = metadata.get(key)
            if value is None:
                return default if default is not None and 0 <= default < n else None
            value = int(value)
            if not 0 <= value < n:
                logger.warning("%s = %d is outside the vocabulary of %d; ignored", key, value, n)
                return default if default is not None and 0 <= default < n else None
            return value

        bos_id = special_id("tokenizer.ggml.bos_token_id", spec.default_bos)
        eos_id = special_id("tokenizer.ggml.eos_token_id", spec.default_eos)
        eot_id = special_id("tokenizer.ggml.eot_token_id", None)
        eom_id = special_id("tokenizer.ggml.eom_token_id", None)
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", spec.add_bos))
        add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", spec.add_eos))
        if add_bos and bos_id is None:
            raise CheckpointFormatError("tokenizer.ggml.add_bos_token is true but there is no BOS token")
        if add_eos and eos_id is None:
            raise CheckpointFormatError("tokenizer.ggml.add_eos_token is true but there is no EOS token")

        backend = spec.backend
        _set_post_processor(backend, tokens, bos_id if add_bos else None, eos_id if add_eos else None)

        stop = _end_of_generation_ids(token_to_id)
        stop.update(i for i in (eos_id, eot_id, eom_id) if i is not None)
        special_ids = [i for i, t in enumerate(types) if t in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN)]
        return cls(
            backend,
            bos_id=bos_id,
            eos_id=eos_id,
            stop_ids=stop,
            pieces=spec.pieces,
            special_ids=special_ids,
            strip_leading_space=spec.strip_leading_space,
        )

    @classmethod
    def from_hf_files(
        cls,
        tokenizer_json: Path | str,
        tokenizer_config: Mapping[str, Any] | None = None,
        generation_config: Mapping[str, Any] | None = None,
    ) -> Tokenizer:
        """Load a checkpoint directory's ``tokenizer.json`` as it is.

        BOS/EOS come from ``tokenizer_config`` (``bos_token``/``eos_token``, a string or
        ``{"content": ...}``); stop ids are EOS, ``generation_config["eos_token_id"]`` (an int
        or a list) and the end-of-turn tokens the vocabulary has. Whether ``encode`` adds BOS or
        EOS is the ``tokenizer.json`` post-processor's call.
        """
        path = Path(tokenizer_json)
        try:
            backend = _HFTokenizer.from_file(str(path))
        except OSError as e:
            raise CheckpointFormatError(f"cannot read {path}: {e}") from e
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise CheckpointFormatError(f"{path} is not a valid tokenizer.json: {e}") from e
        config = dict(tokenizer_config or {})
        gen = dict(generation_config or {})

        def lookup(value: Any, what: str) -> int | None:
            text = _token_text(value)
            if text is None:
                return None
            token_id = backend.token_to_id(text)
            if token_id is None:
                raise CheckpointFormatError(f"{what} {text!r} is not in {path}")
            return token_id

        bos_id = lookup(config.get("bos_token"), "bos_token")
        eos_id = lookup(config.get("eos_token"), "eos_token")
        gen_eos = gen.get("eos_token_id")
        gen_eos_ids = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        if eos_id is None and gen_eos_ids:
            eos_id = int(gen_eos_ids[0])
        if bos_id is None and isinstance(gen.get("bos_token_id"), int):
            bos_id = int(gen["bos_token_id"])

        added = {tok.content: i for i, tok in backend.get_added_tokens_decoder().items()}
        stop = _end_of_generation_ids(added)
        stop.update(int(i) for i in gen_eos_ids)
        if eos_id is not None:
            stop.add(eos_id)
        return cls(backend, bos_id=bos_id, eos_id=eos_id, stop_ids=stop)

    @classmethod
    def from_hf_dir(cls, directory: Path | str) -> Tokenizer:
        """Load a checkpoint directory: ``tokenizer.json``, and ``tokenizer_config.json`` and
        ``generation_config.json`` when present (see :meth:`from_hf_files`)."""
        folder = Path(directory)
        tokenizer_json = folder / "tokenizer.json"
        if not tokenizer_json.is_file():
            raise CheckpointFormatError(f"{folder} has no tokenizer.json")
        configs = [folder / name for name in ("tokenizer_config.json", "generation_config.json")]
        config, gen = (_load_json(p) if p.is_file() else None for p in configs)
        return cls.from_hf_files(tokenizer_json, config, gen)

    # -- encoding and decoding ----------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. Special tokens written in the text (``<|im_start|>``) are
        matched whole; ``add_special_tokens`` adds BOS/EOS where the model asks for them."""
        if not isinstance(text, str):
            raise InvalidArgumentError(f"encode takes a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids``; ``skip_special_tokens`` drops control tokens (BOS, EOS, ...)."""
        ids = self._check_ids(ids)
        if self._pieces is None:
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        pieces = self._pieces
        if skip_special_tokens:
            special = self._special_ids
            data = b"".join([pieces[i] for i in ids if i not in special])
        else:
            data = b"".join([pieces[i] for i in ids])
        text = data.decode("utf-8", errors="replace")
        if self._strip_leading_space and text.startswith(" "):
            text = text[1:]
        return text

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary's spelling of one token (``"Ġthe"``, ``"▁the"``, ``"<|im_end|>"``)."""
        self._check_ids([token_id])
        token = self._backend.id_to_token(int(token_id))
        if token is None:
            raise InvalidArgumentError(f"token id {token_id} has no text")
        return token

    def token_to_id(self, token: str) -> int | None:
        """The id of a token spelled as the vocabulary spells it, or None."""
        return self._backend.token_to_id(token)

    def incremental_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        """A fresh :class:`IncrementalDecoder` over this tokenizer."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        out = [int(i) for i in ids]
        n = self._vocab_size
        for i in out:
            if not 0 <= i < n:
                raise InvalidArgumentError(f"token id {i} is outside the vocabulary (size {n})")
        return out

    # -- properties ---------------------------------------------------------------------------

    @property
    def backend(self) -> _HFTokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._vocab_size

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence token id, or None."""
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        """End-of-sequence token id, or None."""
        return self._eos_id

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end a generation: EOS, EOT and the vocabulary's end-of-turn tokens."""
        return self._stop_ids

    @property
    def bos_text(self) -> str:
        """BOS as text, for chat templates (``""`` when there is none)."""
        return "" if self._bos_id is None else self.id_to_token(self._bos_id)

    @property
    def eos_text(self) -> str:
        """EOS as text, for chat templates (``""`` when there is none)."""
        return "" if self._eos_id is None else self.id_to_token(self._eos_id)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self._vocab_size}, bos_id={self._bos_id}, "
            f"eos_id={self._eos_id}, stop_ids={sorted(self._stop_ids)})"
        )


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


# ---------------------------------------------------------------------------------------------
# Building tokenizers from GGUF metadata
# ---------------------------------------------------------------------------------------------


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
    norm: list[Any] = [normalizers.Prepend(_SPACE_MARK)] if add_space_prefix else []
    norm.append(normalizers.Replace(" ", _SPACE_MARK))
    backend.normalizer = normalizers.Sequence(norm)
    backend.pre_tokenizer = None
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
    # llama.cpp's defaults for an SPM vocabulary: BOS 1, EOS 2, add BOS, no EOS.
    return _BackendSpec(
        backend, pieces, add_bos=True, add_eos=False, default_bos=1, default_eos=2,
        strip_leading_space=add_space_prefix,
    )


def _load_json(path: Path | str) -> dict[str, Any]:
    """Read a JSON object file (tokenizer_config.json, generation_config.json)."""
    p = Path(path)
    try:
        with p.open(encoding="utf-8") as f:
            value = json.load(f)
    except OSError as e:
        raise CheckpointFormatError(f"cannot read {p}: {e}") from e
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{p} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise CheckpointFormatError(f"{p} does not hold a JSON object")
    return value
