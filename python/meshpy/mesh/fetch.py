"""Models from the mesh: nodes serve the parts of models they hold (seeding), and a node
started from a model id alone fetches just the parts it needs, checking each against the
model's manifest.

Seeding: a node serves, over the blob protocol (`net::blobs` in Rust), its model's manifest,
its GGUF metadata (the file's bytes up to the end of its key-values) and every tensor it holds,
and provides the DHT key `<model id>/seeds`. Workers seed what they load; `meshpy seed` seeds a
file without serving layers.

Fetching (`Fetcher`): find the seeders (the DHT key, then each one's listing), take the
manifest from one whose copy hashes to the model id, lay out the store's file from it
(`mesh.store`), then fetch the tensors asked for, several at once, each from one seeder, in
4 MiB reads, hashing as the bytes arrive. A tensor whose hash differs from the manifest's is
never marked held (so never loaded), its seeder is banned for the rest of the fetch, and the
tensor is fetched again from another. Tensors already held are not fetched again, so a fetch
cut short resumes where it stopped (per tensor).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshpy import _native
from meshpy.errors import MeshpyError, ModelFetchError
from meshpy.mesh.identity import ModelIdentity, manifest_bytes
from meshpy.mesh.placement import format_size
from meshpy.mesh.store import ModelRef, ModelStore, StoredModel, check_metadata
from meshpy.models.config import ModelConfig
from meshpy.models.source import ModelSource

__all__ = [
    "Fetcher", "MeshFetcher", "seed", "seed_items", "seeds_key", "name_key", "resolve", "end_tensors", "FetchReport",
    "fetcher_for", "fetch_part",
]

log = logging.getLogger(__name__)

#: Bytes per read: the blob protocol's largest (`net::blobs::MAX_READ`).
READ_BYTES = 4 << 20
#: Tensors fetched at once (each from one seeder).
PARALLEL_TENSORS = 4
#: Largest manifest and GGUF metadata a seeder may claim (a 256k-token vocabulary's metadata is
#: ~10 MiB; a manifest ~100 bytes per tensor): a claim past these is not read.
MAX_MANIFEST_BYTES = 64 << 20
MAX_METADATA_BYTES = 256 << 20
#: Seconds one read may take before its seeder is given up on for that tensor.
READ_TIMEOUT = 60.0


def seeds_key(model_id: str) -> str:
    """The DHT key nodes that serve parts of `model_id` provide."""
    return f"{model_id}/seeds"


def seed_items(source: ModelSource, identity: ModelIdentity) -> dict[str, bytes | tuple[str, int, int]]:
    """What a node holding `source` serves of it: the manifest, the GGUF metadata and every
    tensor it holds (`{}` for a safetensors checkpoint, which cannot be served yet)."""
    ckpt = source.checkpoint
    end = ckpt.metadata_end
    if end is None:
        return {}
    items: dict[str, bytes | tuple[str, int, int]] = {
        "manifest": manifest_bytes(identity.manifest),
        "metadata": (str(ckpt.paths[0]), 0, end),
    }
    for name in identity.manifest["tensors"]:
        if source.held is None or name in source.held:
            path, start, stop = ckpt.byte_range(name)
            items[f"tensor/{name}"] = (str(path), start, stop - start)
    return items


def name_key(name: str) -> str:
    """The DHT key nodes seeding a model called `name` (any version of it) provide."""
    return f"meshpy/name/{name}"


def seed(node: _native.Node, source: ModelSource, identity: ModelIdentity) -> list[str]:
    """Serves what `source` holds of the model and announces it (by id and by name); returns
    the DHT keys provided (none for a checkpoint that cannot be served)."""
    if "hub" in identity.manifest:
        log.info("not seeding %s: a model from the Hub has no per-tensor hashes for peers to check its parts by", identity.id)
        return []
    items = seed_items(source, identity)
    if not items:
        log.info("not seeding %s: only GGUF models are served to peers so far", identity.id)
        return []
    node.seed(identity.id, items)
    keys = [seeds_key(identity.id), name_key(identity.name)]
    for key in keys:
        node.start_providing(key)
    log.info("seeding %d tensors of %s", sum(k.startswith("tensor/") for k in items), identity.id)
    return keys


def resolve(node: _native.Node, ref: ModelRef) -> ModelRef:
    """`ref` if it names a model by id; for a bare name, the one model of that name the mesh's
    seeders serve (ModelFetchError when none or several do, listing them)."""
    if ref.hash_prefix:
        return ref
    ids = set()
    for peer, addrs in node.get_providers(name_key(ref.name)):
        if peer == node.peer_id:
            continue
        try:
            models = node.blob_list(peer, addrs, timeout=READ_TIMEOUT).get("models", {})
        except MeshpyError as e:
            log.info("seeder %s did not answer: %s", peer, e)
            continue
        ids |= {m for m in models if m.startswith(f"{ref.name}@")}
    if not ids:
        raise ModelFetchError(f"nobody in this mesh seeds a model named {ref.name} (and no file of that name is here)")
    if len(ids) > 1:
        raise ModelFetchError(f"several models in this mesh are named {ref.name}: {', '.join(sorted(ids))}; pass one of these ids")
    resolved = ModelRef(ref.name, ids.pop().split("@", 1)[1])
    log.info("model %s is %s", ref.name, resolved)
    return resolved


def end_tensors(manifest: dict[str, Any], source: ModelSource) -> set[str]:
    """The shared tensors only an End node needs: those with a vocabulary-sized dimension
    (embedding, output head). Workers fetch every other shared tensor (norms, RoPE factors,
    which the family readers may read), End nodes all of them."""
    config = source.config.get("text_config") or source.config
    vocab = len(source.metadata.get("tokenizer.ggml.tokens") or []) or int(config.get("vocab_size") or 0)
    return {n for n in manifest["shared"] if vocab and vocab in manifest["tensors"][n]["shape"]}


def fetcher_for(node: _native.Node, model: str | os.PathLike[str], store: ModelStore, *, joined: bool = True) -> Fetcher | None:
    """The fetcher for `model` when it names a model to fetch (a model id or name the mesh
    `node` joined resolves, or a Hub repository), else None (a file, a directory, a packaged
    model)."""
    from meshpy.mesh.hub import HubFetcher, hub_ref
    from meshpy.mesh.store import model_ref

    ref = model_ref(model)
    if ref is not None:
        if not joined:
            raise ModelFetchError(f"{model} is neither a file here nor a packaged model; as a model id or name it needs a "
                                  "mesh that seeds it (--bootstrap)")
        return MeshFetcher(node, resolve(node, ref), store)
    hub = hub_ref(model)
    return HubFetcher(hub, store, agent=node.peer_id) if hub is not None else None


def fetch_part(fetcher: Fetcher, layers: Callable[[ModelSource, ModelConfig], range] | None) -> tuple[StoredModel, ModelSource, ModelConfig, range | None]:
    """Fetches a node's part of a model: the manifest and metadata, the shared tensors a worker
    needs (all of them for an End node, `layers` None), then for a worker the layers `layers`
    picks once the model's config is known (as for a local file). Returns the stored model,
    it opened, its config and the layers."""
    from meshpy.mesh.placement import format_layers
    from meshpy.models.config import read_config

    stored = fetcher.open()
    shared = set(stored.manifest["shared"])
    if layers is not None:
        shared -= end_tensors(stored.manifest, stored.source())
    fetcher.fetch(stored, shared, "the shared tensors" if layers is not None else "the End model's tensors")
    source = stored.source()
    config = read_config(source)
    chosen = None
    if layers is not None:
        chosen = layers(source, config)
        fetcher.fetch(stored, {n for i in chosen for n in stored.manifest["layers"][i]}, f"layers {format_layers(chosen)}")
        source = stored.source()
    log.info("fetched %s of %s in all", format_size(fetcher.report.fetched_bytes), fetcher.what)
    return stored, source, config, chosen


@dataclass
class Seeder:
    peer: str
    addrs: list[str]
    #: Items served, with their lengths.
    items: dict[str, int]


@dataclass
class FetchReport:
    """What a fetch read from the network."""

    #: Every byte received: manifest, metadata, tensors (those rejected included).
    fetched_bytes: int = 0
    #: Bytes of tensors that failed their hash and were fetched again.
    rejected_bytes: int = 0
    #: Bytes received from each seeder.
    by_peer: Counter[str] | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"fetched_bytes": self.fetched_bytes, "rejected_bytes": self.rejected_bytes,
                "by_peer": dict(self.by_peer or {}), "seconds": round(self.seconds, 3)}


class Fetcher:
    """Fills a stored model with the tensors a node needs, from somewhere (`_fetch_tensor`:
    the mesh's seeders, `MeshFetcher`; the Hub, `mesh.hub.HubFetcher`), several at once, with a
    progress bar, after checking the disk has room; counts what it read (`report`)."""

    def __init__(self, what: object, *, parallel: int = PARALLEL_TENSORS) -> None:
        #: The model, for messages.
        self.what = what
        self.parallel = parallel
        self.report = FetchReport(by_peer=Counter())
        self._lock = threading.Lock()

    def open(self) -> StoredModel:
        """The model in the store, found or created with its metadata fetched."""
        raise NotImplementedError

    def _fetch_tensor(self, stored: StoredModel, name: str, where: tuple[Path, int, int]) -> str:
        """Writes tensor `name` into its place `(file, offset, length)` and checks it; returns
        the name."""
        raise NotImplementedError

    def fetch(self, stored: StoredModel, names: set[str] | list[str], what: str) -> None:
        """Makes the store hold every tensor in `names`, fetching those it lacks; `what` names
        them in logs and progress."""
        from meshpy.cli.progress import ProgressBar

        missing = sorted(set(names) - stored.held)
        if not missing:
            return
        layout = stored.layout()
        need = sum(layout[n][2] for n in missing)
        free = shutil.disk_usage(stored.dir).free
        if need > free:
            raise ModelFetchError(
                f"{what} of {self.what} need {format_size(need)} on disk, but {stored.dir} has {format_size(free)} free "
                "(choose another place with --store DIR)"
            )
        started = time.monotonic()
        log.info("fetching %s of %s: %d tensors, %s", what, self.what, len(missing), format_size(need))
        bar = ProgressBar(f"fetching {what}", need >> 20)
        done = 0
        try:
            with ThreadPoolExecutor(self.parallel, thread_name_prefix="meshpy-fetch") as pool:
                for name in pool.map(lambda n: self._fetch_tensor(stored, n, layout[n]), missing):
                    with self._lock:
                        stored.mark_held([name])
                        done += layout[name][2]
                        bar.update(done >> 20)
        finally:
            bar.close()
        self.report.seconds += time.monotonic() - started
        log.info("fetched %s of %s: %s in %.1f s", what, self.what, format_size(need), time.monotonic() - started)

    def _count(self, source: str, n: int) -> None:
        with self._lock:
            self.report.fetched_bytes += n
            assert self.report.by_peer is not None
            self.report.by_peer[source] += n


class MeshFetcher(Fetcher):
    """Fetches the parts of model `ref` this node needs from the seeders in the mesh `node`
    joined, into `store`. `banned` maps each seeder caught serving wrong bytes to why."""

    def __init__(self, node: _native.Node, ref: ModelRef, store: ModelStore, *, parallel: int = PARALLEL_TENSORS) -> None:
        super().__init__(ref, parallel=parallel)
        self.node = node
        self.ref = ref
        self.store = store
        self.banned: dict[str, str] = {}
        self._seeders: list[Seeder] | None = None

    def open(self) -> StoredModel:
        """The model in the store: found there, or created from a seeder's manifest and
        metadata (each checked against the model id)."""
        stored = self.store.find(self.ref)
        if stored is not None:
            return stored
        reasons = []
        for seeder in self.seeders():
            if "manifest" not in seeder.items or "metadata" not in seeder.items:
                continue
            if seeder.items["manifest"] > MAX_MANIFEST_BYTES or seeder.items["metadata"] > MAX_METADATA_BYTES:
                self._ban(seeder, f"it claims a {seeder.items['manifest']}-byte manifest and {seeder.items['metadata']}-byte metadata")
                continue
            try:
                manifest = self._read_item(seeder, "manifest")
                digest = hashlib.sha256(manifest).digest()
                parsed = json.loads(manifest)
                if not self.ref.matches(digest, str(parsed.get("name"))) or manifest_bytes(parsed) != manifest:
                    self._ban(seeder, f"it served a manifest that is not model {self.ref}'s (hash {digest.hex()[:12]})")
                    continue
                metadata = self._read_item(seeder, "metadata")
                stored = self.store.create(manifest, metadata)
            except (MeshpyError, ValueError) as e:
                reasons.append(f"{seeder.peer}: {e}")
                log.warning("cannot take model %s's manifest from %s: %s", self.ref, seeder.peer, e)
                continue
            if not check_metadata(stored):
                self.store.remove(stored)
                self._ban(seeder, "it served metadata that does not match the manifest's hash")
                continue
            log.info("model %s: manifest and metadata from %s; %d tensors in %d layers", self.ref, seeder.peer,
                     len(stored.manifest["tensors"]), len(stored.manifest["layers"]))
            return stored
        raise ModelFetchError(f"no seeder of model {self.ref} served its manifest intact ({'; '.join(reasons) or 'banned: ' + str(self.banned)})")

    def seeders(self, refresh: bool = False) -> list[Seeder]:
        """The peers serving parts of the model, with what each serves (looked up once,
        again on `refresh`)."""
        if self._seeders is not None and not refresh:
            return [s for s in self._seeders if s.peer not in self.banned]
        providers = self.node.get_providers(seeds_key(self.ref.id))
        found = []
        for peer, addrs in providers:
            if peer == self.node.peer_id or peer in self.banned:
                continue
            try:
                listing = self.node.blob_list(peer, addrs, timeout=READ_TIMEOUT)
            except MeshpyError as e:
                log.info("seeder %s of %s did not answer: %s", peer, self.ref, e)
                continue
            items = listing.get("models", {}).get(self.ref.id)
            if isinstance(items, dict) and items:
                found.append(Seeder(peer, list(addrs), {str(k): int(v) for k, v in items.items()}))
        if not found:
            raise ModelFetchError(
                f"nobody seeds model {self.ref}: no peer in this mesh serves it (a worker started from the model's "
                "file, or `meshpy seed --model FILE`, seeds it)"
            )
        self._seeders = found
        return found

    def _fetch_tensor(self, stored: StoredModel, name: str, where: tuple[Path, int, int]) -> str:
        path, offset, length = where
        expected = stored.manifest["tensors"][name]["sha256"]
        item = f"tensor/{name}"
        tried: list[str] = []
        for refresh in (False, True):
            try:
                seeders = self.seeders(refresh=refresh)
            except ModelFetchError:
                seeders = []
            candidates = [s for s in seeders if s.items.get(item) == length and s.peer not in tried]
            # Spread tensors over the seeders that have them.
            start = int(expected[:8], 16) % len(candidates) if candidates else 0
            for seeder in candidates[start:] + candidates[:start]:
                tried.append(seeder.peer)
                try:
                    if self._copy(path, seeder, item, offset, length) == expected:
                        return name
                except MeshpyError as e:
                    log.warning("seeder %s failed serving %s: %s; trying another", seeder.peer, name, e)
                    continue
                with self._lock:
                    self.report.rejected_bytes += length
                self._ban(seeder, f"its bytes of tensor {name} do not match the manifest's hash")
        raise ModelFetchError(f"no seeder served tensor {name} of {self.ref} intact (tried {', '.join(tried) or 'none'})")

    def _copy(self, path: Path, seeder: Seeder, item: str, offset: int, length: int) -> str:
        """Reads `item` from `seeder` into `path` at `offset`; returns its SHA-256 (hex)."""
        digest = hashlib.sha256()
        fd = os.open(path, os.O_WRONLY)
        try:
            for at in range(0, length, READ_BYTES):
                data = self.node.blob_read(seeder.peer, self.ref.id, item, at, min(READ_BYTES, length - at),
                                           seeder.addrs, timeout=READ_TIMEOUT)
                self._count(seeder.peer, len(data))
                digest.update(data)
                os.pwrite(fd, data, offset + at)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        return digest.hexdigest()

    def _read_item(self, seeder: Seeder, item: str) -> bytes:
        length = seeder.items[item]
        parts = []
        for at in range(0, length, READ_BYTES):
            data = self.node.blob_read(seeder.peer, self.ref.id, item, at, min(READ_BYTES, length - at), seeder.addrs,
                                       timeout=READ_TIMEOUT)
            self._count(seeder.peer, len(data))
            parts.append(data)
        return b"".join(parts)

    def _ban(self, seeder: Seeder, why: str) -> None:
        log.warning("banning seeder %s of %s: %s", seeder.peer, self.ref, why)
        with self._lock:
            self.banned[seeder.peer] = why


