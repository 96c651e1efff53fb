"""Which model a worker serves, named by its content only: a manifest of the model and the
hash of that manifest.

The manifest lists what defines the model: its metadata (a GGUF file's key-values, tokenizer
included, as canonical JSON; a checkpoint directory's config, tokenizer and generation files,
each by content) and every tensor (type, shape, byte count, SHA-256 of its bytes), grouped by
layer. The model's digest is the SHA-256 of the manifest, so renaming or moving the files
changes nothing, and any changed tensor byte or metadata value changes the id. The readable
name comes from the metadata too (a GGUF's basename, size and quantization; a directory's
`_name_or_path` or model type), never from the file name.

Hashing a large model takes seconds (an 8B GGUF is 4.4 GB), so each model's tensor hashes are
cached per set of weight files (path, size, mtime, ctime, inode) in `$MESHPY_CACHE_DIR` (default
`$XDG_CACHE_HOME/meshpy`, else `~/.cache/meshpy`), and a terminal shows a progress bar
meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshpy.models.source import ModelSource

__all__ = [
    "ModelIdentity", "model_identity", "model_manifest", "manifest_bytes", "manifest_digest", "metadata_hash", "layer_key",
    "cache_dir", "WORKERS_KEY", "CHECKERS_KEY",
]

log = logging.getLogger(__name__)

#: DHT key every worker provides, so `meshpy status` can list workers of any model.
WORKERS_KEY = "meshpy/workers"
#: DHT key End nodes that check workers (--verify) provide, so `meshpy status` can show their bans.
CHECKERS_KEY = "meshpy/checkers"
_CACHE_FILE = "tensor-hashes.json"
#: Bumped when the manifest's layout changes (the digest changes with it).
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class ModelIdentity:
    """A model as the mesh names it: readable `name`, 32-byte SHA-256 `digest`."""

    name: str
    digest: bytes
    #: The manifest the digest hashes (see the module documentation).
    manifest: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

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


def slug(text: str) -> str:
    """`text` as a model name: lower case, `[a-z0-9._-]`, at most 64 characters."""
    out = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.")
    return out[:64] or "model"


#: llama.cpp's `general.file_type` values, as its file names spell them.
_FILE_TYPES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 8: "q5_0", 9: "q5_1", 10: "q2_k", 11: "q3_k_s",
               12: "q3_k_m", 13: "q3_k_l", 14: "q4_k_s", 15: "q4_k_m", 16: "q5_k_s", 17: "q5_k_m", 18: "q6_k",
               30: "iq4_xs", 32: "bf16"}


def _readable_name(source: ModelSource) -> str:
    """A name from the model's own metadata (not its file name)."""
    if source.format == "gguf":
        m = source.metadata
        base = m.get("general.basename") or m.get("general.name") or m.get("general.architecture") or "model"
        parts = [str(base), str(m.get("general.size_label") or ""), _FILE_TYPES.get(m.get("general.file_type"), "")]
        return slug("-".join(p for p in parts if p))
    origin = str(source.config.get("_name_or_path") or "").rstrip("/").rsplit("/", 1)[-1]
    return slug(origin or str(source.config.get("model_type") or "model"))


_LAYER = re.compile(r"(?:^|\.)(?:blk|layers|h)\.(\d+)\.")


def _layer_of(tensor: str) -> int | None:
    """The layer a tensor belongs to (`blk.3.attn_q.weight`, `model.layers.3.mlp...`), or None."""
    m = _LAYER.search(tensor)
    return int(m.group(1)) if m else None


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=repr).encode()


def _metadata_files(source: ModelSource) -> dict[str, str]:
    """A checkpoint directory's defining non-weight files, by name, with the SHA-256 of each."""
    names = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
             "special_tokens_map.json", "chat_template.jinja", "chat_template.json"]
    out = {}
    root = source.path if source.path.is_dir() else source.path.parent  # a lone .safetensors file
    for name in names:
        path = root / name
        if path.is_file():
            out[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


class _TensorHashCache:
    """Tensor hashes per model, keyed by its weight files' resolved paths, sizes and mtimes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.entries: dict[str, dict[str, Any]] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    @staticmethod
    def key(files: list[Path]) -> str:
        # ctime changes with any write, even one that restores the mtime (cp -p, rsync -t).
        stats = [(str(f.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
                 for f in sorted(files) for st in [f.stat()]]
        return hashlib.sha256(_canonical(stats)).hexdigest()

    def get(self, key: str) -> dict[str, str] | None:
        entry = self.entries.get(key)
        return entry.get("tensors") if isinstance(entry, dict) else None

    def put(self, key: str, files: list[Path], tensors: dict[str, str]) -> None:
        self.entries[key] = {"files": [str(f.resolve()) for f in files], "tensors": tensors}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename, so concurrent processes never read half a file.
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".hashes-")
            with os.fdopen(fd, "w") as f:
                json.dump(self.entries, f)
            os.replace(tmp, self.path)
        except OSError as e:  # a read-only home only costs hashing again next time
            log.warning("cannot save the hash cache %s: %s", self.path, e)


def _tensor_hashes(source: ModelSource) -> dict[str, str]:
    """SHA-256 of every tensor's bytes, from the cache or computed (with a progress bar)."""
    from meshpy.cli.progress import ProgressBar

    files = list(source.checkpoint.paths)
    cache = _TensorHashCache(cache_dir() / _CACHE_FILE)
    key = cache.key(files)
    hit = cache.get(key)
    names = source.checkpoint.tensor_names()
    if hit is not None and set(hit) == set(names):
        return hit
    total = sum(f.stat().st_size for f in files)
    bar = ProgressBar(f"hashing {source.path.name}", total >> 20)
    done = 0
    out = {}
    try:
        for name in names:
            # In Rust, in place: no copy, and the file's pages do not stay in this process.
            out[name] = source.checkpoint.tensor_sha256(name)
            start, end = source.checkpoint.byte_range(name)[1:]
            done += end - start
            bar.update(done >> 20)
    finally:
        bar.close()
    log.info("hashed %d tensors of %s (%d bytes)", len(out), source.path, done)
    cache.put(key, files, out)
    return out


def model_manifest(source: ModelSource, hub: dict[str, Any] | None = None, name: str | None = None) -> dict[str, Any]:
    """The model's manifest (see the module documentation): JSON-ready. For a model from the
    Hub (`mesh.hub`), of which this node may hold only a part, `hub` names the repository,
    commit and each file's SHA-256 in place of the tensors' hashes, and `name` may replace the
    name the metadata gives."""
    ckpt = source.checkpoint
    hashes = _tensor_hashes(source) if hub is None else None
    tensors: dict[str, dict[str, Any]] = {}
    layers: dict[int, list[str]] = {}
    shared: list[str] = []
    for tensor in ckpt.tensor_names():
        dtype, shape = ckpt.tensor_info(tensor)
        tensors[tensor] = {"type": dtype, "shape": list(shape)}
        if hashes is not None:
            tensors[tensor]["sha256"] = hashes[tensor]
        layer = _layer_of(tensor)
        (shared if layer is None else layers.setdefault(layer, [])).append(tensor)
    if source.format == "gguf":
        metadata = {"gguf": metadata_hash(source.metadata)}
    else:
        metadata = _metadata_files(source)
    manifest = {
        "meshpy_manifest": MANIFEST_VERSION,
        "format": source.format,
        "name": name or _readable_name(source),
        "metadata": metadata,
        "tensors": tensors,
        "layers": [layers[i] for i in sorted(layers)],
        "shared": shared,
    }
    if hub is not None:
        manifest["hub"] = hub
    return manifest


def metadata_hash(metadata: dict[str, Any]) -> str:
    """The SHA-256 (hex) a manifest records of a GGUF's key-values."""
    return hashlib.sha256(_canonical(metadata)).hexdigest()


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The manifest as its digest hashes it (canonical JSON): what peers serve and stores keep."""
    return _canonical(manifest)


def manifest_digest(manifest: dict[str, Any]) -> bytes:
    """The SHA-256 naming a manifest (of its canonical JSON)."""
    return hashlib.sha256(_canonical(manifest)).digest()


def model_identity(source: ModelSource) -> ModelIdentity:
    """The model's readable name and content hash, from its manifest (a stored model's own,
    since a store lacks the tensors it did not fetch)."""
    manifest = source.manifest if source.manifest is not None else model_manifest(source)
    return ModelIdentity(manifest["name"], manifest_digest(manifest), manifest)
