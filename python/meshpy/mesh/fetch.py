"""Models from the mesh: nodes serve the parts of models they hold (seeding), and a node
started from a model id alone fetches just the parts it needs, checking each against the
model's manifest.

Seeding: a node serves, over the blob protocol (`net::blobs` in Rust), its model's manifest,
its GGUF metadata (the file's bytes up to the end of its key-values) and tensors it holds, and
provides the DHT keys `<model id>/seeds` and `meshpy/name/<name>`. Workers seed the layers they
serve and the shared tensors; `meshpy seed` seeds a whole file without serving layers.

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
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshpy import _native
from meshpy.errors import MeshpyError, ModelFetchError
from meshpy.mesh.identity import ModelIdentity, manifest_bytes
from meshpy.mesh.placement import format_size
from meshpy.mesh.store import MetadataMismatch, ModelRef, ModelStore, StoredModel, parse_model_ref
from meshpy.models.config import ModelConfig
from meshpy.models.source import ModelSource

__all__ = [
    "Fetcher", "MeshFetcher", "seed", "seed_items", "cannot_seed", "seeds_key", "name_key", "resolve", "end_tensors", "FetchReport",
    "fetcher_for", "fetch_part", "names_remote_model",
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
#: A read may take this long plus its bytes at `MIN_READ_RATE` before its seeder is given up on
#: for that tensor; a seeder failing `MAX_FAILURES` reads is dropped for the rest of the fetch.
READ_TIMEOUT_BASE = 10.0
MIN_READ_RATE = 1 << 20
MAX_FAILURES = 3
#: What a seeder refusing for its limits (not failing) says (`net::peers`, `net::blobs`).
_BUSY = ("requests per second", "streams open here", "busy serving other reads")
#: Times a read refused as busy is tried again (after 0.25 s, 0.5 s, ...) before it counts as failed.
BUSY_RETRIES = 4
#: Seeders are listed again (when a tensor has none left) at most this often.
REFRESH_SECONDS = 10.0


def read_timeout(nbytes: int) -> float:
    """Seconds a read of `nbytes` may take."""
    return READ_TIMEOUT_BASE + nbytes / MIN_READ_RATE


def write_ranges(path: Path, offset: int, length: int, chunk: int, read: Callable[[int, int], bytes]) -> None:
    """Writes `length` bytes into `path` at `offset`, `chunk` bytes at a time as `read(at, n)`
    gives them (`at` counted from the start of the range), then flushes them to disk."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for at in range(0, length, chunk):
            os.pwrite(fd, read(at, min(chunk, length - at)), offset + at)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _listed_items(listing: object, model_id: str) -> dict[str, int] | None:
    """The items a seeder's listing says it serves of `model_id` (`{}` for none), or None when
    the listing is malformed."""
    models = listing.get("models") if isinstance(listing, dict) else None
    if not isinstance(models, dict):
        return None
    items = models.get(model_id, {})
    if not isinstance(items, dict) or not all(isinstance(k, str) and type(v) is int and v >= 0 for k, v in items.items()):
        return None
    return dict(items)


def seeds_key(model_id: str) -> str:
    """The DHT key nodes that serve parts of `model_id` provide."""
    return f"{model_id}/seeds"


def cannot_seed(source: ModelSource, identity: ModelIdentity) -> str | None:
    """Why `source` cannot be served to peers, or None."""
    if "hub" in identity.manifest:
        return "a model from the Hub has no per-tensor hashes for peers to check its parts by; each node fetches it from the Hub"
    if source.checkpoint.metadata_end is None:
        return "only GGUF models are served to peers so far, not safetensors checkpoints"
    return None


def seed_items(source: ModelSource, identity: ModelIdentity, only: set[str] | None = None) -> dict[str, bytes | tuple[str, int, int]]:
    """What a node holding `source` serves of it: the manifest, the GGUF metadata and every
    tensor it holds (those in `only`, if given)."""
    ckpt = source.checkpoint
    end = ckpt.metadata_end
    assert end is not None and cannot_seed(source, identity) is None
    items: dict[str, bytes | tuple[str, int, int]] = {
        "manifest": manifest_bytes(identity.manifest),
        "metadata": (str(ckpt.paths[0]), 0, end),
    }
    for name in identity.manifest["tensors"]:
        if (source.held is None or name in source.held) and (only is None or name in only):
            path, start, stop = ckpt.byte_range(name)
            items[f"tensor/{name}"] = (str(path), start, stop - start)
    return items


def name_key(name: str) -> str:
    """The DHT key nodes seeding a model called `name` (any version of it) provide."""
    return f"meshpy/name/{name}"


def seed(node: _native.Node, source: ModelSource, identity: ModelIdentity, only: set[str] | None = None) -> list[str]:
    """Serves what `source` holds of the model (of the tensors in `only`, if given) and
    announces it (by id and by name); returns the DHT keys provided (none for a checkpoint
    that cannot be served, `cannot_seed`)."""
    why = cannot_seed(source, identity)
    if why is not None:
        log.info("not seeding %s: %s", identity.id, why)
        return []
    items = seed_items(source, identity, only)
    node.seed(identity.id, items)
    keys = [seeds_key(identity.id), name_key(identity.name)]
    for key in keys:
        node.start_providing(key)
    log.info("seeding %d tensors of %s (full id %s@%s)", sum(k.startswith("tensor/") for k in items), identity.id,
             identity.name, identity.digest.hex())
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
            listing = node.blob_list(peer, addrs, timeout=read_timeout(0))
        except MeshpyError as e:
            log.info("seeder %s did not answer: %s", peer, e)
            continue
        models = listing.get("models") if isinstance(listing, dict) else None
        for model in models if isinstance(models, dict) else ():
            parsed = parse_model_ref(model) if isinstance(model, str) else None
            if parsed is not None and parsed.name == ref.name and len(parsed.hash_prefix) == 12:
                ids.add(model)
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


def names_remote_model(model: str | os.PathLike[str]) -> bool:
    """Whether `model` names a model to fetch (a model id or name, a Hub repository) rather
    than a file, a directory or a packaged model here."""
    from meshpy.mesh.hub import hub_ref
    from meshpy.mesh.store import model_ref

    return model_ref(model) is not None or hub_ref(model) is not None


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
    by_peer: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"fetched_bytes": self.fetched_bytes, "rejected_bytes": self.rejected_bytes,
                "by_peer": dict(self.by_peer), "seconds": round(self.seconds, 3)}


class Fetcher(ABC):
    """Fills a stored model with the tensors a node needs, from somewhere (`_fetch_tensor`:
    the mesh's seeders, `MeshFetcher`; the Hub, `mesh.hub.HubFetcher`), several at once, with a
    progress bar, after checking the disk has room; counts what it read (`report`)."""

    def __init__(self, what: object, *, parallel: int = PARALLEL_TENSORS) -> None:
        #: The model, for messages.
        self.what = what
        self.parallel = parallel
        self.report = FetchReport()
        self._lock = threading.Lock()

    @abstractmethod
    def open(self) -> StoredModel:
        """The model in the store, found or created with its metadata fetched."""

    @abstractmethod
    def _fetch_tensor(self, stored: StoredModel, name: str, where: tuple[Path, int, int]) -> str:
        """Writes tensor `name` into its place `(file, offset, length)` and checks it (against
        what its source offers to check by); returns the name."""

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
            self.report.by_peer[source] += n


class MeshFetcher(Fetcher):
    """Fetches the parts of model `ref` this node needs from the seeders in the mesh `node`
    joined, into `store`. `banned` maps each seeder caught serving wrong bytes to why."""

    def __init__(self, node: _native.Node, ref: ModelRef, store: ModelStore, *, parallel: int = PARALLEL_TENSORS) -> None:
        super().__init__(ref, parallel=parallel)
        self.node = node
        self.ref = ref
        self.store = store
        #: Seeders left out of this fetch (caught lying, or failing), with why.
        self.banned: dict[str, str] = {}
        self._seeders: list[Seeder] | None = None
        self._listed_at = 0.0
        self._failures: Counter[str] = Counter()

    def open(self) -> StoredModel:
        """The model in the store: found there, or created from a seeder's manifest and
        metadata (each checked against the model id). When seeders serve different manifests
        that all match a short id, none is taken: the full hash must say which."""
        stored = self.store.find(self.ref)
        if stored is not None:
            return stored
        manifests: dict[bytes, tuple[bytes, list[Seeder]]] = {}
        reasons = []
        for seeder in self.seeders():
            if "manifest" not in seeder.items or "metadata" not in seeder.items:
                continue
            if seeder.items["manifest"] > MAX_MANIFEST_BYTES or seeder.items["metadata"] > MAX_METADATA_BYTES:
                self._ban(seeder, f"it claims a {seeder.items['manifest']}-byte manifest and {seeder.items['metadata']}-byte metadata")
                continue
            try:
                manifest = self._read_item(seeder, "manifest")
            except MeshpyError as e:
                reasons.append(f"{seeder.peer}: {e}")
                continue
            digest = hashlib.sha256(manifest).digest()
            if not self._is_manifest(manifest, digest):
                self._ban(seeder, f"it served a manifest that is not model {self.ref}'s (hash {digest.hex()[:12]})")
                continue
            manifests.setdefault(digest, (manifest, []))[1].append(seeder)
        if len(manifests) > 1:
            full = ", ".join(f"{self.ref.name}@{d.hex()}" for d in manifests)
            raise ModelFetchError(f"seeders serve {len(manifests)} different models that match {self.ref}: {full}; pass "
                                  "the full id of the one you mean (someone may be forging a model of the same short id)")
        for digest, (manifest, seeders) in manifests.items():
            for seeder in seeders:
                try:
                    stored = self.store.create(manifest, self._read_item(seeder, "metadata"))
                except MetadataMismatch:
                    self._ban(seeder, "it served metadata that does not match the manifest's hash")
                    continue
                except (MeshpyError, ValueError) as e:
                    reasons.append(f"{seeder.peer}: {e}")
                    log.warning("cannot take model %s's metadata from %s: %s", self.ref, seeder.peer, e)
                    continue
                log.info("model %s is %s@%s: manifest and metadata from %s; %d tensors in %d layers", self.ref,
                         self.ref.name, digest.hex(), seeder.peer, len(stored.manifest["tensors"]), len(stored.manifest["layers"]))
                return stored
        raise ModelFetchError(f"no seeder of model {self.ref} served its manifest and metadata intact "
                              f"({'; '.join(reasons) or 'banned: ' + str(self.banned)})")

    def _is_manifest(self, manifest: bytes, digest: bytes) -> bool:
        """Whether `manifest` (with that hash) is one the model id names, in canonical form."""
        if not digest.hex().startswith(self.ref.hash_prefix):
            return False
        try:
            parsed = json.loads(manifest)
        except ValueError:
            return False
        return isinstance(parsed, dict) and parsed.get("name") == self.ref.name and manifest_bytes(parsed) == manifest \
            and isinstance(parsed.get("tensors"), dict)

    def seeders(self, refresh: bool = False) -> list[Seeder]:
        """The peers serving parts of the model, with what each serves (looked up once, again
        on `refresh` but at most every `REFRESH_SECONDS`); those banned or dropped left out."""
        with self._lock:
            stale = self._seeders is None or (refresh and time.monotonic() - self._listed_at >= REFRESH_SECONDS)
            if stale:
                self._seeders = self._list_seeders()
                self._listed_at = time.monotonic()
            assert self._seeders is not None
            current = [s for s in self._seeders if s.peer not in self.banned]
        if not current:
            raise ModelFetchError(
                f"nobody seeds model {self.ref}: no peer in this mesh serves it (a worker started from the model's "
                "file, or `meshpy seed --model FILE`, seeds it)" + (f"; dropped: {self.banned}" if self.banned else "")
            )
        return current

    def _list_seeders(self) -> list[Seeder]:
        found = []
        for peer, addrs in self.node.get_providers(seeds_key(self.ref.id)):
            if peer == self.node.peer_id or peer in self.banned:
                continue
            try:
                listing = self.node.blob_list(peer, addrs, timeout=read_timeout(0))
            except MeshpyError as e:
                log.info("seeder %s of %s did not answer: %s", peer, self.ref, e)
                continue
            items = _listed_items(listing, self.ref.id)
            if items is None:
                log.info("seeder %s of %s sent a malformed listing; skipping it", peer, self.ref)
            elif items:
                found.append(Seeder(peer, list(addrs), items))
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
                got = self._copy_patiently(path, seeder, item, offset, length)
                if got is None:
                    continue
                if got == expected:
                    return name
                with self._lock:
                    self.report.rejected_bytes += length
                self._ban(seeder, f"its bytes of tensor {name} do not match the manifest's hash")
        raise ModelFetchError(f"no seeder served tensor {name} of {self.ref} intact (tried {', '.join(tried) or 'none'})")

    def _copy_patiently(self, path: Path, seeder: Seeder, item: str, offset: int, length: int) -> str | None:
        """`_copy`, again after a pause while the seeder says it is busy; None if it fails."""
        for attempt in range(BUSY_RETRIES + 1):
            try:
                return self._copy(path, seeder, item, offset, length)
            except MeshpyError as e:
                if attempt < BUSY_RETRIES and any(busy in str(e) for busy in _BUSY):
                    time.sleep(0.25 * 2**attempt)
                    continue
                self._failed(seeder, f"serving {item}: {e}")
                return None
        return None

    def _copy(self, path: Path, seeder: Seeder, item: str, offset: int, length: int) -> str:
        """Reads `item` from `seeder` into `path` at `offset`; returns its SHA-256 (hex)."""
        digest = hashlib.sha256()

        def read(at: int, n: int) -> bytes:
            data = self._read(seeder, item, at, n)
            digest.update(data)
            return data

        write_ranges(path, offset, length, READ_BYTES, read)
        return digest.hexdigest()

    def _read_item(self, seeder: Seeder, item: str) -> bytes:
        length = seeder.items[item]
        return b"".join(self._read(seeder, item, at, min(READ_BYTES, length - at)) for at in range(0, length, READ_BYTES))

    def _read(self, seeder: Seeder, item: str, at: int, n: int) -> bytes:
        data = self.node.blob_read(seeder.peer, self.ref.id, item, at, n, seeder.addrs, timeout=read_timeout(n))
        self._count(seeder.peer, len(data))
        return data

    def _failed(self, seeder: Seeder, why: str) -> None:
        """Counts a failed read; a seeder failing `MAX_FAILURES` times is dropped for this fetch."""
        log.warning("seeder %s of %s failed %s; trying another", seeder.peer, self.ref, why)
        with self._lock:
            self._failures[seeder.peer] += 1
            failures = self._failures[seeder.peer]
        if failures == MAX_FAILURES:
            self._ban(seeder, f"it failed {failures} reads (unreachable, or slower than {MIN_READ_RATE >> 10} KiB/s)")

    def _ban(self, seeder: Seeder, why: str) -> None:
        log.warning("banning seeder %s of %s: %s", seeder.peer, self.ref, why)
        with self._lock:
            self.banned[seeder.peer] = why


