"""Models from the Hugging Face Hub by name, each node downloading only its part.

`--model org/repo` takes the repository's one GGUF file, or its safetensors checkpoint (one
file, or shards with their index); `org/repo:Q4_K_M` picks the GGUF of that quantization and
`org/repo:file.gguf` a file by name. Everything goes through `huggingface_hub`: the endpoint
(`HF_ENDPOINT`), the token (`HF_TOKEN` or `huggingface-cli login`), offline mode
(`HF_HUB_OFFLINE=1`), and its cache for the small files (config, tokenizer, index).

The weights are read with HTTP range requests into the node's store (`mesh.store`), as sparse
files at the repository's own offsets: first each file's header (a GGUF's metadata and tensor
infos, grown until it parses; a safetensors shard's JSON header), then only the tensors this
node needs: a worker its layers and the small shared tensors, an End node the shared ones
(embedding, final norm, head). So no node downloads more than its share, and a node started
again finds what it already has.

The model's id is the hash of a manifest naming the repository, its commit and each file's
SHA-256 (as the Hub's LFS records them), with every tensor's type and shape: every node
resolving the same name at the same commit agrees on it without holding the whole model.
Such a manifest has no per-tensor hashes (no node could compute them from its part), so these
parts are fetched from the Hub over TLS, never from peers; a mesh whose nodes all hold the
file names it by content instead (`mesh.identity`), and the two ids differ.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshpy import _native
from meshpy.errors import MeshpyError, ModelFetchError
from meshpy.mesh.fetch import READ_TIMEOUT_BASE, Fetcher, read_timeout, write_ranges
from meshpy.mesh.identity import manifest_bytes, model_manifest, slug
from meshpy.mesh.store import MANIFEST_FILE, WEIGHTS_FILE, ModelStore, StoredModel, build_into, sparse_file, write_atomically
from meshpy.models.source import open_model_source

__all__ = ["HubRef", "hub_ref", "HubFetcher", "download_whole"]

log = logging.getLogger(__name__)

#: What the store keeps of the Hub's answer: repository, commit, the files' hashes and sizes, the
#: choice asked for, and which store file holds which repository file (`local_files`).
HUB_FILE = "meshpy-hub.json"
#: Bytes per range request.
READ_BYTES = 16 << 20
#: A GGUF header is read from this many bytes up, twice as many each try, to at most the cap.
FIRST_HEADER_BYTES = 1 << 20
MAX_HEADER_BYTES = 512 << 20
#: Non-weight files of a safetensors checkpoint that a node copies whole (those present).
SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
               "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "model.safetensors.index.json")
INDEX_FILE = "model.safetensors.index.json"

_HUB_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<choice>[\w.+-]+))?$")
_SPLIT_GGUF = re.compile(r"-\d{5}-of-\d{5}\.gguf$")


@dataclass(frozen=True)
class HubRef:
    """`org/repo`, and the quantization or file chosen (`Q4_K_M`, `model-q8_0.gguf`), if any."""

    repo: str
    choice: str | None = None

    def __str__(self) -> str:
        return f"{self.repo}:{self.choice}" if self.choice else self.repo

    @property
    def key(self) -> str:
        """A directory name for this reference."""
        return f"{self.repo.replace('/', '--')}--{self.choice or 'default'}"


def hub_ref(model: str | os.PathLike[str]) -> HubRef | None:
    """The Hub reference `model` spells (`org/repo`, `org/repo:Q4_K_M`), unless it names a file
    or directory here, or looks like a path to one (`models/x.gguf`)."""
    text = str(model)
    if Path(text).expanduser().exists():
        return None
    m = _HUB_REF.match(text.strip())
    if not m or m["repo"].endswith((".gguf", ".safetensors", ".json", ".bin")):
        return None
    return HubRef(m["repo"], m["choice"])


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _pick(ref: HubRef, files: set[str], index: Any = None) -> tuple[str, list[str]]:
    """`("gguf", [file])` or `("safetensors", [shards])` for `ref` among the repository's
    `files`; `index` is its safetensors index (parsed), if it has one."""
    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    if ref.choice is not None:
        if ref.choice.endswith(".gguf"):
            chosen = [f for f in ggufs if f == ref.choice or f.rsplit("/", 1)[-1] == ref.choice]
        else:
            quant = re.compile(rf"(?:^|[-_.]){re.escape(ref.choice)}(?:[-_.]|$)", re.IGNORECASE)
            chosen = [f for f in ggufs if quant.search(f.rsplit("/", 1)[-1].removesuffix(".gguf"))]
        if len(chosen) != 1:
            what = "no GGUF file" if not chosen else f"several GGUF files ({', '.join(chosen)})"
            raise ModelFetchError(f"{ref.repo} has {what} for {ref.choice!r}; its GGUF files: {', '.join(ggufs) or 'none'}")
        name = chosen[0]
        if _SPLIT_GGUF.search(name):
            raise ModelFetchError(f"{ref.repo}: {name} is one part of a split GGUF, which meshpy cannot read; merge it "
                                  "(llama-gguf-split --merge) or choose another file")
        return "gguf", [name]
    if index is not None:
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFetchError(f"{ref.repo}: {INDEX_FILE} has no weight_map")
        shards = sorted(set(weight_map.values()))
        bad = [s for s in shards if not isinstance(s, str) or "/" in s or s.startswith(".") or s not in files]
        if bad:
            raise ModelFetchError(f"{ref.repo}: {INDEX_FILE} names shards that are not files of the repository: {bad[:4]}")
        return "safetensors", shards
    if "model.safetensors" in files:
        return "safetensors", ["model.safetensors"]
    if len(ggufs) == 1:
        return _pick(HubRef(ref.repo, ggufs[0]), files, index)
    if ggufs:
        raise ModelFetchError(f"{ref.repo} has several GGUF files; choose one as {ref.repo}:QUANT or {ref.repo}:FILE "
                              f"({', '.join(ggufs)})")
    raise ModelFetchError(f"{ref.repo} has neither a GGUF file nor a safetensors checkpoint")


class HubFetcher(Fetcher):
    """Fetches the parts of Hub model `ref` this node needs into `store` (see the module
    documentation)."""

    def __init__(self, ref: HubRef, store: ModelStore, agent: str | None = None) -> None:
        super().__init__(ref)
        self.ref = ref
        self.store = store
        #: Sent in the user agent (a node's peer id), so a server's logs tell nodes apart.
        self.user_agent = {"meshpy": _native.__version__, **({"node": agent} if agent else {})}
        self._files: dict[str, str] = {}  # store file name -> repository file name
        self._commit = ""

    def open(self) -> StoredModel:
        """The model in the store: there already for the repository's current commit (or, offline,
        the last one fetched), else created: its headers and small files fetched, its manifest
        written."""
        root = self.store.root / "hub" / self.ref.key
        if _offline():
            directory = self._last(root)
            if directory is None:
                raise ModelFetchError(f"offline (HF_HUB_OFFLINE), and {self.ref} is not in the store {self.store.root}")
            return self._opened(directory)
        from huggingface_hub import HfApi

        try:
            info = HfApi(user_agent=self.user_agent).model_info(self.ref.repo, files_metadata=True)
        except Exception as e:  # noqa: BLE001 - huggingface_hub raises many kinds; the message says which
            raise ModelFetchError(f"cannot look up {self.ref.repo} on the Hub: {e}") from e
        # The commit names a directory: only a commit hash may.
        if not isinstance(info.sha, str) or not re.fullmatch(r"[0-9a-f]{40}", info.sha):
            raise ModelFetchError(f"the Hub answered {self.ref.repo} with no valid commit hash ({info.sha!r})")
        self._commit = info.sha
        files = {s.rfilename: s for s in info.siblings or []}
        directory = root / self._commit
        if not (directory / MANIFEST_FILE).is_file():
            build_into(directory, lambda aside: self._build(aside, files))
        (root / "last").write_text(self._commit)
        return self._opened(directory)

    def _build(self, directory: Path, files: dict[str, Any]) -> None:
        """Fills a new store directory: headers, small files, the record of the Hub's answer and
        the manifest."""
        index = None
        if INDEX_FILE in files:
            try:
                index = json.loads(Path(self._download_small(INDEX_FILE)).read_text())
            except ValueError as e:
                raise ModelFetchError(f"{self.ref.repo}: {INDEX_FILE} is not JSON: {e}") from e
        kind, chosen = _pick(self.ref, set(files), index)
        sha = {f: (files[f].lfs.sha256 if files[f].lfs else files[f].blob_id) for f in chosen}
        sizes = {f: int(files[f].lfs.size if files[f].lfs else files[f].size or 0) for f in chosen}
        if kind == "gguf":
            self._files = {WEIGHTS_FILE: chosen[0]}
            self._gguf_header(directory / WEIGHTS_FILE, chosen[0], sizes[chosen[0]])
            name = None
        else:
            self._files = {f: f for f in chosen}  # plain file names (checked by `_pick`)
            for f in SMALL_FILES:
                if f in files:
                    shutil.copyfile(self._download_small(f), directory / f)
            for f in chosen:
                self._safetensors_header(directory / f, f, sizes[f])
            name = slug(self.ref.repo.rsplit("/", 1)[-1])
        # The files chosen name the model, not how they were asked for (`:q4_1` or `:Q4_1`).
        hub = {"repo": self.ref.repo, "commit": self._commit, "files": sha}
        manifest = model_manifest(open_model_source(directory), hub=hub, name=name)
        write_atomically(directory / HUB_FILE, json.dumps({**hub, "local_files": self._files, "choice": self.ref.choice,
                                                           "sizes": sizes}).encode())
        write_atomically(directory / MANIFEST_FILE, manifest_bytes(manifest))
        log.info("model %s: %s at commit %s, %d tensors in %d layers", self.ref, ", ".join(chosen), self._commit[:12],
                 len(manifest["tensors"]), len(manifest["layers"]))

    def _last(self, root: Path) -> Path | None:
        try:
            directory = root / (root / "last").read_text().strip()
        except OSError:
            return None
        return directory if (directory / MANIFEST_FILE).is_file() else None

    def _opened(self, directory: Path) -> StoredModel:
        hub = json.loads((directory / HUB_FILE).read_text())
        self._files, self._commit = hub["local_files"], hub["commit"]
        log.info("model %s: commit %s from the store", self.ref, self._commit[:12])
        return StoredModel(directory)

    def fetch(self, stored: StoredModel, names: set[str] | list[str], what: str) -> None:
        missing = set(names) - stored.held
        if missing and _offline():
            raise ModelFetchError(f"offline (HF_HUB_OFFLINE), and the store lacks {len(missing)} tensors of {what} of {self.ref}")
        super().fetch(stored, names, what)

    def _url(self, repo_file: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.ref.repo, repo_file, revision=self._commit)

    def _download_small(self, repo_file: str) -> str:
        from huggingface_hub import hf_hub_download

        try:
            return str(hf_hub_download(self.ref.repo, repo_file, revision=self._commit or None, user_agent=self.user_agent))
        except Exception as e:  # noqa: BLE001 - huggingface_hub raises many kinds; the message says which
            raise ModelFetchError(f"{self.ref.repo}: cannot download {repo_file}: {e}") from e

    def _read(self, repo_file: str, start: int, length: int) -> bytes:
        """`length` (> 0) bytes of a repository file from `start`: one range request, whose
        answer must say it is that range before anything is read, and must come within
        `read_timeout(length)`."""
        from huggingface_hub.utils import build_hf_headers, get_session

        headers = build_hf_headers(user_agent=self.user_agent)
        headers["Range"] = f"bytes={start}-{start + length - 1}"
        headers["Accept-Encoding"] = "identity"
        deadline = time.monotonic() + read_timeout(length)
        what = f"{self.ref}: {repo_file} bytes {start}..+{length}"
        try:
            with get_session().stream("GET", self._url(repo_file), headers=headers, follow_redirects=True,
                                      timeout=READ_TIMEOUT_BASE) as response:
                got_range = response.headers.get("Content-Range", "")
                if response.status_code != 206 or not got_range.startswith(f"bytes {start}-{start + length - 1}/"):
                    raise ModelFetchError(f"{what}: HTTP {response.status_code}, Content-Range {got_range!r} (the server "
                                          "must answer range requests: it cannot serve parts otherwise)")
                parts, n = [], 0
                for part in response.iter_bytes():
                    n += len(part)
                    if n > length or time.monotonic() > deadline:
                        raise ModelFetchError(f"{what}: {'more bytes than asked for' if n > length else 'too slow'}")
                    parts.append(part)
        except ModelFetchError:
            raise
        except Exception as e:  # noqa: BLE001 - the transport's errors, named in the message
            raise ModelFetchError(f"{what}: {e}") from e
        if n != length:
            raise ModelFetchError(f"{what}: {n} bytes came")
        self._count("hub", length)
        return b"".join(parts)

    def _gguf_header(self, path: Path, repo_file: str, size: int) -> None:
        """Reads the GGUF's first bytes, more each time, until its header parses from them alone."""
        if size <= 0:
            raise ModelFetchError(f"{self.ref}: the Hub lists {repo_file} with no size")
        sparse_file(path, b"", size)
        have = 0
        want = min(FIRST_HEADER_BYTES, size)
        while True:
            write_ranges(path, have, want - have, READ_BYTES, lambda at, n, base=have: self._read(repo_file, base + at, n))
            have = want
            error: Exception | None = None
            try:
                ckpt = _native.Checkpoint([path])
                # Parsed from real bytes only if the data section starts within them (the rest of
                # the file reads as zeros, which can parse too).
                first = min((ckpt.byte_range(n)[1] for n in ckpt.tensor_names()), default=size)
                if first <= have:
                    return
            except MeshpyError as e:
                error = e
            if have >= min(size, MAX_HEADER_BYTES):
                raise ModelFetchError(f"{self.ref}: no GGUF header in the first {have} bytes of {repo_file}: {error}")
            want = min(want * 2, size, MAX_HEADER_BYTES)

    def _safetensors_header(self, path: Path, repo_file: str, size: int) -> None:
        """Reads a safetensors file's header (its length, then its JSON)."""
        if size < 8:
            raise ModelFetchError(f"{self.ref}: the Hub lists {repo_file} as {size} bytes, too few for safetensors")
        n = int.from_bytes(self._read(repo_file, 0, 8), "little")
        if not 0 < n <= min(size - 8, 100 << 20):
            raise ModelFetchError(f"{self.ref}: {repo_file} declares a {n}-byte header in a {size}-byte file")
        sparse_file(path, n.to_bytes(8, "little") + self._read(repo_file, 8, n), size)

    def _fetch_tensor(self, stored: StoredModel, name: str, where: tuple[Path, int, int]) -> str:
        """Writes tensor `name` from the Hub: trusted over TLS, as no per-tensor hash exists
        (a whole download is checked against the files' hashes, `download_whole`)."""
        path, offset, length = where
        repo_file = self._files[path.name]
        if length:
            write_ranges(path, offset, length, READ_BYTES, lambda at, n: self._read(repo_file, offset + at, n))
        return name

    def check_files(self, stored: StoredModel) -> None:
        """Checks each whole weight file against the SHA-256 the Hub lists for it (every tensor
        must be held)."""
        hub = json.loads((stored.dir / HUB_FILE).read_text())
        for local, repo_file in hub["local_files"].items():
            digest = hashlib.sha256()
            with open(stored.dir / local, "rb") as f:
                while chunk := f.read(16 << 20):
                    digest.update(chunk)
            if digest.hexdigest() != stored.manifest["hub"]["files"][repo_file]:
                raise ModelFetchError(f"{self.ref}: {repo_file} as downloaded does not match the SHA-256 the Hub lists for it")


def download_whole(ref: HubRef, store: str | os.PathLike[str] | None = None) -> Path:
    """Downloads all of Hub model `ref` into the store (what is there already is kept) and
    returns its directory, for a process that runs every layer."""
    fetcher = HubFetcher(ref, ModelStore(store))
    stored = fetcher.open()
    if not stored.held >= set(stored.manifest["tensors"]):
        fetcher.fetch(stored, set(stored.manifest["tensors"]), "the whole model")
        fetcher.check_files(stored)
    return stored.dir
