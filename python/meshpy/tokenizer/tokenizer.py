"""The :class:`Tokenizer`: its constructors (GGUF metadata, ``tokenizer.json``), encoding and
decoding, and which tokens are BOS, EOS and end-of-generation."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from meshpy.errors import CheckpointFormatError, InvalidArgumentError
from meshpy.tokenizer.gguf_byte_level import _build_byte_level_bpe
from meshpy.tokenizer.gguf_gemma4 import _build_gemma4_bpe
from meshpy.tokenizer.gguf_sentencepiece import _build_sentencepiece_bpe
from meshpy.tokenizer.gguf_vocab import (
    TOKEN_TYPE_CONTROL,
    TOKEN_TYPE_NORMAL,
    TOKEN_TYPE_UNKNOWN,
    _as_str,
    _required,
    _set_post_processor,
)
from meshpy.tokenizer.incremental_decoder import IncrementalDecoder

__all__ = ["Tokenizer"]

logger = logging.getLogger(__name__)

# Tokens that end generation, by text (llama.cpp's list of end-of-generation tokens).
_END_OF_GENERATION_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
    "<|endoftext|>", "<|eom_id|>", "<EOT>", "<|end_of_text|>", "<end_of_utterance>",
    "<turn|>", "<|tool_response>",
)


def _end_of_generation_ids(token_to_id: Mapping[str, int]) -> set[int]:
    ids = {token_to_id[t] for t in _END_OF_GENERATION_TEXTS if t in token_to_id}
    # gpt-oss (harmony): "<|end|>" ends a message, not the generation, when these exist.
    if "<|return|>" in token_to_id and "<|call|>" in token_to_id and "<|end|>" in token_to_id:
        ids.discard(token_to_id["<|end|>"])
    return ids


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or {"content": ...}."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise CheckpointFormatError(f"special token must be a string or {{'content': str}}, got {value!r}")


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
        elif model == "gemma4":
            spec = _build_gemma4_bpe(metadata, tokens, types)
        else:
            raise CheckpointFormatError(
                f"unsupported tokenizer.ggml.model {model!r}; supported: 'gpt2' (byte-level BPE), "
                "'llama' (SentencePiece), 'gemma4' (BPE over escaped spaces)"
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

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token adds to the text (for a byte-level vocabulary, maybe part of
        a UTF-8 character; where the tokenizer keeps no byte table, its text's UTF-8)."""
        (token_id,) = self._check_ids([token_id])
        if self._pieces is not None:
            return self._pieces[token_id]
        return self._backend.decode([token_id], skip_special_tokens=False).encode("utf-8")

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
