"""Resolving a user's ``--model PATH`` to a model's files.

A model is either one GGUF file (weights, config and tokenizer in its metadata) or a
Hugging Face checkpoint directory: ``config.json``, ``model.safetensors`` or
``model.safetensors.index.json`` with the shards its ``weight_map`` names, and optionally
``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja`` and
``generation_config.json``. :func:`open_model_source` finds those files, reads the JSON ones
and opens the weights (memory-mapped, nothing loaded yet).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable
from typing import Any, Literal

from meshpy._native import Checkpoint
from meshpy.errors import CheckpointFormatError, CheckpointIOError, ModelSourceError

__all__ = ["ModelSource", "open_model_source"]

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# How many directory entries an error message lists.
_LISTED = 20


@dataclass(frozen=True, eq=False)
class ModelSource:
    """The files of one model, opened and read.

    Attributes:
        path: The resolved path the user gave: a GGUF file or a checkpoint directory.
        format: ``"gguf"`` or ``"safetensors"``.
        checkpoint: The memory-mapped weights.
        metadata: GGUF key-values (tokenizer arrays included); ``{}`` for a directory.
        config: ``config.json``; ``{}`` for GGUF (its config is in ``metadata``).
        tokenizer_json: ``tokenizer.json`` if present.
        tokenizer_config: ``tokenizer_config.json``, or ``{}``.
        chat_template: The Jinja chat template the checkpoint ships, if any.
        generation_config: ``generation_config.json``, or ``{}``.
        manifest: For a model in the store (`meshpy.mesh.store`), its manifest; else None.
        held: For a model in the store, the tensors it holds (the rest are not on this disk);
            None when every tensor is.
    """

    path: Path
    format: Literal["gguf", "safetensors"]
    checkpoint: Checkpoint
    metadata: dict[str, Any]
    config: dict[str, Any]
    tokenizer_json: Path | None
    tokenizer_config: dict[str, Any]
    chat_template: str | None
    generation_config: dict[str, Any]
    manifest: dict[str, Any] | None = None
    held: frozenset[str] | None = None

    def require(self, names: Iterable[str], what: str) -> None:
        """Raises ModelSourceError unless every tensor in `names` (those `what` needs) is on
        this disk: a store holds only the tensors this node fetched."""
        if self.held is None:
            return
        missing = sorted(set(names) - self.held)
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise ModelSourceError(
                f"{self.path} holds only part of the model, not {shown}, which {what} needs; start from the "
                "model id so the missing tensors are fetched from the mesh"
            )

    @property
    def eos_token_ids(self) -> list[int]:
        """End-of-sequence token ids: generation_config, else config, else GGUF metadata."""
        for source, key in (
            (self.generation_config, "eos_token_id"),
            (self.config, "eos_token_id"),
            (self.metadata, "tokenizer.ggml.eos_token_id"),
        ):
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return [value]
            if isinstance(value, list) and all(isinstance(v, int) for v in value):
                return list(value)
        return []


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; errors name the file."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise CheckpointIOError(f"{path}: cannot read: {e}") from e
    except UnicodeDecodeError as e:
        raise CheckpointFormatError(f"{path}: not UTF-8 text: {e}") from e
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise CheckpointFormatError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def _optional_json(path: Path) -> dict[str, Any]:
    return _read_json(path) if path.is_file() else {}


def _listing(directory: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    if not names:
        return "it is empty"
    shown = ", ".join(names[:_LISTED])
    more = f", ... and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
    return f"it holds: {shown}{more}"


def _chat_template(directory: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """``chat_template.jinja``, else ``chat_template.json``, else tokenizer_config's template
    (a string, or a list of ``{"name", "template"}`` from which "default" is taken)."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointIOError(f"{jinja}: cannot read: {e}") from e
    template: Any = _optional_json(directory / "chat_template.json").get("chat_template")
    if template is None:
        template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _shards(directory: Path) -> tuple[list[Path], dict[str, str]]:
    """The safetensors files of a directory and the index's weight map (``{}`` unsharded)."""
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise CheckpointFormatError(
                f"{index_path}: \"weight_map\" is missing or does not map tensor names to files"
            )
        shards = []
        for name in sorted(set(weight_map.values())):
            shard = directory / name
            if Path(name).name != name:
                raise CheckpointFormatError(f"{index_path}: shard name {name!r} is not a file name")
            if not shard.is_file():
                raise ModelSourceError(
                    f"{index_path} names shard {name!r}, which is missing from {directory}"
                )
            shards.append(shard)
        if not shards:
            raise CheckpointFormatError(f"{index_path}: \"weight_map\" names no shards")
        return shards, weight_map
    single = directory / SINGLE_FILE
    if single.is_file():
        return [single], {}
    raise ModelSourceError(
        f"{directory} has no weights: expected {SINGLE_FILE}, {INDEX_FILE} with its shards, "
        f"or one .gguf file; {_listing(directory)}"
    )


def _gguf_source(path: Path, checkpoint: Checkpoint) -> ModelSource:
    from meshpy.mesh.store import stored_part  # the store builds on this module

    metadata = checkpoint.metadata()
    template = metadata.get("tokenizer.chat_template")
    manifest, held = stored_part(Path(checkpoint.paths[0]).parent)
    return ModelSource(
        path=path,
        format="gguf",
        checkpoint=checkpoint,
        metadata=metadata,
        config={},
        tokenizer_json=None,
        tokenizer_config={},
        chat_template=template if isinstance(template, str) else None,
        generation_config={},
        manifest=manifest,
        held=held,
    )


def _hf_source(
    path: Path, directory: Path, weights: list[Path], weight_map: dict[str, str]
) -> ModelSource:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelSourceError(
            f"{directory} has weights but no config.json; {_listing(directory)}"
        )
    config = _read_json(config_path)
    checkpoint = Checkpoint(weights)
    if checkpoint.format != "safetensors":
        raise CheckpointFormatError(f"{weights[0]}: expected safetensors, found {checkpoint.format}")
    for tensor, shard in weight_map.items():
        if tensor not in checkpoint:
            raise CheckpointFormatError(
                f"{directory / INDEX_FILE}: tensor {tensor!r} is mapped to {shard}, which lacks it"
            )
    from meshpy.mesh.store import stored_part  # the store builds on this module

    tokenizer_config = _optional_json(directory / "tokenizer_config.json")
    tokenizer_json = directory / "tokenizer.json"
    manifest, held = stored_part(directory)
    return ModelSource(
        path=path,
        format="safetensors",
        checkpoint=checkpoint,
        metadata={},
        config=config,
        tokenizer_json=tokenizer_json if tokenizer_json.is_file() else None,
        tokenizer_config=tokenizer_config,
        chat_template=_chat_template(directory, tokenizer_config),
        generation_config=_optional_json(directory / "generation_config.json"),
        manifest=manifest,
        held=held,
    )


def open_model_source(path: str | os.PathLike[str]) -> ModelSource:
    """Finds and opens the model at ``path``: a GGUF file, a checkpoint directory, or a
    directory holding exactly one ``.gguf`` file. The format of a file is judged by its
    first bytes; a lone ``.safetensors`` file takes its config from its own directory.

    Raises:
        ModelSourceError: ``path`` is missing, or lacks weights, config or a shard.
        CheckpointFormatError: a weights or JSON file is corrupt (the message names it).
        CheckpointIOError: a file cannot be read.
    """
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise ModelSourceError(f"model path {path} does not exist")
    if path.is_file():
        checkpoint = Checkpoint([path])
        if checkpoint.format == "gguf":
            source = _gguf_source(path, checkpoint)
        else:
            source = _hf_source(path, path.parent, [path], {})
    elif not (path / INDEX_FILE).is_file() and not (path / SINGLE_FILE).is_file() and (
        ggufs := sorted(path.glob("*.gguf"))
    ):
        if len(ggufs) > 1:
            names = ", ".join(p.name for p in ggufs)
            raise ModelSourceError(f"{path} holds several GGUF files ({names}); pass one of them")
        source = _gguf_source(path, Checkpoint(ggufs))
    else:
        shards, weight_map = _shards(path)
        source = _hf_source(path, path, shards, weight_map)
    log.debug(
        "model source %s: %s, %d tensors", path, source.format, len(source.checkpoint)
    )
    return source
