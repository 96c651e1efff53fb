"""Which model a worker serves: a readable name plus a content hash of its weights and
config, so two files that share a name but differ in content never end up on one route.

The hash is SHA-256 over the files that define the model (a GGUF file whole; for an HF
directory `config.json` and every weight file, each preceded by its name and size). Hashing
a large model takes seconds, so results are cached per file (path, size, mtime) in
`$MESHPY_CACHE_DIR` (default `$XDG_CACHE_HOME/meshpy`, else `~/.cache/meshpy`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from meshpy.models.source import ModelSource

__all__ = ["ModelIdentity", "model_identity", "layer_key", "cache_dir", "WORKERS_KEY"]

log = logging.getLogger(__name__)

#: DHT key every worker provides, so `meshpy status` can list workers of any model.
WORKERS_KEY = "meshpy/workers"
#: DHT key End nodes that check workers (--verify) provide, so `meshpy status` can show their bans.
CHECKERS_KEY = "meshpy/checkers"
_CACHE_FILE = "file-hashes.json"
_CHUNK = 8 << 20


@dataclass(frozen=True)
class ModelIdentity:
    """A model as the mesh names it: readable `name`, 32-byte SHA-256 `digest`."""

    name: str
    digest: bytes

    @property
    def id(self) -> str:
        """`<name>@<first 12 hex digits of the hash>`: the prefix of the model's DHT keys."""
        return f"{self.name}@{self.digest.hex()[:12]}"

    def layer_key(self, layer: int) -> str:
        """The DHT key a worker provides for each layer it serves."""
        return layer_key(self.id, layer)


def layer_key(model_id: str, layer: int) -> str:
    """`<model id>/layer/<i>`, the same key the Rust side builds (`net::layer_key`)."""
    return f"{model_id}/layer/{layer}"


def cache_dir() -> Path:
    """Where meshpy keeps caches (file hashes)."""
    if os.environ.get("MESHPY_CACHE_DIR"):
        return Path(os.environ["MESHPY_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "meshpy"


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.")
    return slug[:64] or "model"


def _defining_files(source: ModelSource) -> list[Path]:
    if source.format == "gguf":
        return [source.path]
    files = [source.path / "config.json"]
    files += sorted(set(source.checkpoint.paths), key=lambda p: p.name)
    return files


class _HashCache:
    """SHA-256 per file, keyed by resolved path and invalidated by size or mtime."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.entries: dict[str, dict[str, object]] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.dirty = False

    def digest(self, file: Path) -> bytes:
        st = file.stat()
        key = str(file.resolve())
        entry = self.entries.get(key)
        if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
            return bytes.fromhex(str(entry["sha256"]))
        h = hashlib.sha256()
        with open(file, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        log.info("hashed %s (%d bytes)", file, st.st_size)
        self.entries[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}
        self.dirty = True
        return h.digest()

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename, so concurrent processes never read half a file.
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".hashes-")
            with os.fdopen(fd, "w") as f:
                json.dump(self.entries, f)
            os.replace(tmp, self.path)
        except OSError as e:  # a read-only home only costs re-hashing next time
            log.warning("cannot save the hash cache %s: %s", self.path, e)


def model_identity(source: ModelSource) -> ModelIdentity:
    """The model's readable name and content hash."""
    cache = _HashCache(cache_dir() / _CACHE_FILE)
    h = hashlib.sha256(b"meshpy model v1\n")
    for file in _defining_files(source):
        h.update(f"{file.name}\n{file.stat().st_size}\n".encode())
        h.update(cache.digest(file))
    cache.save()
    stem = source.path.name.removesuffix(".gguf") if source.format == "gguf" else source.path.name
    return ModelIdentity(_slug(stem), h.digest())
