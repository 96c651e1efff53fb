"""The local model store: the parts of models this node fetched, each checked against its
manifest, ready to load and to serve to others.

A stored model is a directory (`<store>/<name>@<full hash>/` for a model fetched from peers,
`<store>/hub/...` for one from the Hub, `mesh.hub`) holding:

- `meshpy-manifest.json`: the model's manifest (see `mesh.identity`), byte for byte as its hash
  names it;
- the weights, as sparse files: only the tensors this node fetched hold bytes; the rest of each
  file is a hole, which takes no disk space and which nothing reads (loading checks that every
  tensor it needs is held). From peers, `model.gguf`, laid out from the manifest alone
  (`_native.gguf_store_header`: the model's metadata, then every tensor in name order), so every
  node lays it out alike. From the Hub, the repository's own files at their own offsets (a GGUF
  as `model.gguf`; safetensors shards, index, config and tokenizer files under their names);
- `meshpy-held.json`: the tensors written and checked, written after their bytes are flushed,
  so a fetch cut short resumes from the last tensor it finished.

Why one sparse GGUF and not a file per tensor: the engine loads a store like any GGUF (memory
mapped, nothing copied), and the file's config-bearing tensor infos (shapes, types) are all
there for the family readers, while the disk holds only this node's share.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from meshpy import _native
from meshpy.errors import InvalidArgumentError
from meshpy.mesh.identity import ModelIdentity, cache_dir, manifest_digest, metadata_hash
from meshpy.models.source import ModelSource, open_model_source

__all__ = ["ModelStore", "StoredModel", "default_store_dir", "parse_model_ref", "model_ref", "ModelRef", "stored_part", "build_into", "locked",
           "MetadataMismatch", "write_atomically", "sparse_file"]

log = logging.getLogger(__name__)

MANIFEST_FILE = "meshpy-manifest.json"
WEIGHTS_FILE = "model.gguf"
HELD_FILE = "meshpy-held.json"
LOCK_FILE = ".meshpy-lock"

#: `name@hex`: a model id (12 hex digits, as DHT keys spell it) or a full 64-digit hash; or a
#: bare name, for the mesh to resolve (not one that looks like a file).
_MODEL_REF = re.compile(r"^(?P<name>[a-z0-9._-]+)(?:@(?P<hash>[0-9a-f]{12}|[0-9a-f]{64}))?$")
_FILE_SUFFIXES = (".gguf", ".safetensors", ".json")


class ModelRef:
    """A model named by content: its readable name and a prefix of its hash (12 hex digits, as
    a model id spells it, or all 64), or by name alone (`hash_prefix` empty) until the mesh
    resolves it (`mesh.fetch.resolve`)."""

    def __init__(self, name: str, hash_prefix: str) -> None:
        self.name = name
        self.hash_prefix = hash_prefix

    @property
    def id(self) -> str:
        """The model id (`name@` and 12 hex digits), the prefix of the model's DHT keys."""
        return f"{self.name}@{self.hash_prefix[:12]}"

    def matches(self, digest: bytes, name: str) -> bool:
        return digest.hex().startswith(self.hash_prefix) and name == self.name

    def __str__(self) -> str:
        return f"{self.name}@{self.hash_prefix}" if self.hash_prefix else self.name


def parse_model_ref(text: str) -> ModelRef | None:
    """The model reference `text` spells (`smollm2-135m-q4_1@1a2b3c4d5e6f`, or a bare name
    such as `smollm2-135m-q4_1`), or None."""
    m = _MODEL_REF.match(text.strip())
    if not m or (not m["hash"] and m["name"].endswith(_FILE_SUFFIXES)):
        return None
    return ModelRef(m["name"], m["hash"] or "")


def model_ref(model: str | os.PathLike[str]) -> ModelRef | None:
    """The model id or name `model` spells, unless it names a file, a directory or a
    packaged model."""
    from meshpy.models.packaged import PACKAGED_MODELS

    text = str(model)
    if Path(text).expanduser().exists() or text in PACKAGED_MODELS:
        return None
    return parse_model_ref(text)


def default_store_dir() -> Path:
    """`<cache dir>/models` (see `mesh.identity.cache_dir`)."""
    return cache_dir() / "models"


class StoredModel:
    """One model's directory in the store (see the module documentation)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.manifest_bytes = (directory / MANIFEST_FILE).read_bytes()
        self.manifest: dict[str, Any] = json.loads(self.manifest_bytes)
        self.digest = manifest_digest(self.manifest)
        try:
            self.held: set[str] = set(json.loads((directory / HELD_FILE).read_text()))
        except (OSError, ValueError):
            self.held = set()

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity(self.manifest["name"], self.digest, self.manifest)

    @property
    def weights(self) -> list[Path]:
        """The weight files (sparse)."""
        gguf = self.dir / WEIGHTS_FILE
        return [gguf] if gguf.is_file() else sorted(self.dir.glob("*.safetensors"))

    def layout(self) -> dict[str, tuple[Path, int, int]]:
        """Each tensor's file and `(offset, length)` there."""
        ckpt = _native.Checkpoint(self.weights)
        return {name: (path, start, end - start) for name in ckpt.tensor_names() for path, start, end in [ckpt.byte_range(name)]}

    def source(self) -> ModelSource:
        """The stored model, opened (its held tensors known to the loaders)."""
        return open_model_source(self.dir)

    def mark_held(self, names: list[str]) -> None:
        """Records tensors as written and verified (their bytes must be flushed already),
        keeping what other processes sharing the store recorded meanwhile."""
        with locked(self.dir / LOCK_FILE):
            try:
                self.held |= set(json.loads((self.dir / HELD_FILE).read_text()))
            except (OSError, ValueError):
                pass
            self.held.update(names)
            write_atomically(self.dir / HELD_FILE, json.dumps(sorted(self.held)).encode())

    def disk_bytes(self) -> int:
        """Bytes the store's weight files take on disk (holes excluded)."""
        return sum(os.stat(f).st_blocks * 512 for f in self.weights)


class ModelStore:
    """The models this node stores, under `root` (default `default_store_dir()`)."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_store_dir()

    def find(self, ref: ModelRef) -> StoredModel | None:
        """The stored model `ref` names, if any."""
        if not self.root.is_dir():
            return None
        for directory in sorted(self.root.glob(f"{ref.name}@{ref.hash_prefix[:12]}*")):
            if (directory / MANIFEST_FILE).is_file() and (directory / WEIGHTS_FILE).is_file():
                stored = StoredModel(directory)
                if ref.matches(stored.digest, stored.manifest.get("name", "")):
                    return stored
        return None

    def create(self, manifest_bytes: bytes, metadata_prefix: bytes) -> StoredModel:
        """A new stored model from its manifest (already checked against its hash) and its GGUF
        metadata bytes (a GGUF's bytes up to the end of its key-values): the weights file's
        header, the rest of the file a hole, and the manifest. Raises MetadataMismatch when the
        metadata is not the manifest's. Built aside and renamed into place, so the store never
        holds half a model, and a process sharing the store that created it first wins."""
        manifest = json.loads(manifest_bytes)
        if manifest.get("format") != "gguf":
            raise InvalidArgumentError(
                f"model {manifest.get('name')} is a {manifest.get('format')} checkpoint; only GGUF models can be "
                "fetched from peers so far"
            )
        directory = self.root / f"{manifest['name']}@{manifest_digest(manifest).hex()}"
        header, layout = _layout(manifest, metadata_prefix)
        end = max((offset + length for offset, length in layout.values()), default=len(header))

        def build(aside: Path) -> None:
            sparse_file(aside / WEIGHTS_FILE, header, end)
            if manifest.get("metadata", {}).get("gguf") != metadata_hash(_native.Checkpoint([aside / WEIGHTS_FILE]).metadata()):
                raise MetadataMismatch(f"the metadata served for {manifest['name']} is not its manifest's")
            write_atomically(aside / MANIFEST_FILE, manifest_bytes)

        return StoredModel(build_into(directory, build))


class MetadataMismatch(ValueError):
    """Metadata that is not what the model's manifest says."""


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Holds an exclusive lock on `path` (created if missing) against other processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def build_into(directory: Path, build: Callable[[Path], None]) -> Path:
    """`directory`, made by `build` in a new directory beside it then renamed into place, unless
    it exists already (another process made it first: its copy is kept)."""
    if directory.is_dir():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    aside = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".building-"))
    try:
        build(aside)  # its files are flushed (sparse_file, write_atomically) before the rename
        try:
            os.rename(aside, directory)
        except OSError:
            if not directory.is_dir():
                raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    return directory


def stored_part(directory: Path) -> tuple[dict[str, Any] | None, frozenset[str] | None]:
    """For a model directory in a store, its manifest and the tensors it holds; `(None, None)`
    for any other directory."""
    if not (directory / MANIFEST_FILE).is_file():
        return None, None
    stored = StoredModel(directory)
    return stored.manifest, frozenset(stored.held)


def sparse_file(path: Path, head: bytes, size: int) -> None:
    """Writes `head` at the start of a new file `size` bytes long, the rest a hole."""
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())



def _layout(manifest: dict[str, Any], prefix: bytes) -> tuple[bytes, dict[str, tuple[int, int]]]:
    names = sorted(manifest["tensors"])
    tensors = [(name, manifest["tensors"][name]["type"], manifest["tensors"][name]["shape"]) for name in names]
    header, ranges = _native.gguf_store_header(prefix, tensors)
    return header, dict(zip(names, ranges, strict=True))


def write_atomically(path: Path, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file, so readers never see half of it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
