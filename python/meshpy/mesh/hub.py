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

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshpy import _native
from meshpy.errors import MeshpyError, ModelFetchError
from meshpy.mesh.fetch import Fetcher
from meshpy.mesh.identity import _slug, manifest_bytes, model_manifest
from meshpy.mesh.store import HELD_FILE, MANIFEST_FILE, WEIGHTS_FILE, ModelStore, StoredModel, sparse_file, write_atomically
from meshpy.models.source import open_model_source

__all__ = ["HubRef", "hub_ref", "HubFetcher", "download_whole"]

log = logging.getLogger(__name__)

#: What the store keeps of the Hub's answer: repository, choice, commit, files.
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
    or directory here."""
    text = str(model)
    if Path(text).expanduser().exists():
        return None
    m = _HUB_REF.match(text.strip())
    return HubRef(m["repo"], m["choice"]) if m else None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _pick(ref: HubRef, files: dict[str, dict[str, Any]]) -> tuple[str, list[str]]:
    """`("gguf", [file])` or `("safetensors", [shards])` for `ref` among the repository's files."""
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
    if INDEX_FILE in files:
        index = files[INDEX_FILE]
        return "safetensors", sorted(set(index["weight_map"].values()))
    if "model.safetensors" in files:
        return "safetensors", ["model.safetensors"]
    if len(ggufs) == 1:
        return _pick(HubRef(ref.repo, ggufs[0]), files)
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
        files = {s.rfilename: s for s in info.siblings or []}
        self._commit = str(info.sha)
        directory = root / self._commit
        if (directory / MANIFEST_FILE).is_file():
            (root / "last").write_text(self._commit)
            return self._opened(directory)
        index = None
        if INDEX_FILE in files:
            index = json.loads(Path(self._download_small(INDEX_FILE)).read_text())
        kind, chosen = _pick(self.ref, {**{f: {} for f in files}, **({INDEX_FILE: index} if index else {})})
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        sha = {f: (files[f].lfs.sha256 if files[f].lfs else files[f].blob_id) for f in chosen}
        sizes = {f: int(files[f].lfs.size if files[f].lfs else files[f].size or 0) for f in chosen}
        if kind == "gguf":
            self._files = {WEIGHTS_FILE: chosen[0]}
            self._gguf_header(directory / WEIGHTS_FILE, chosen[0], sizes[chosen[0]])
            name = None
        else:
            self._files = {Path(f).name: f for f in chosen}
            for f in SMALL_FILES:
                if f in files:
                    shutil.copyfile(self._download_small(f), directory / f)
            for f in chosen:
                self._safetensors_header(directory / Path(f).name, f, sizes[f])
            name = _slug(self.ref.repo.rsplit("/", 1)[-1])
        # The files chosen name the model, not how they were asked for (`:q4_1` or `:Q4_1`).
        hub = {"repo": self.ref.repo, "commit": self._commit, "files": sha}
        manifest = model_manifest(open_model_source(directory), hub=hub, name=name)
        write_atomically(directory / HUB_FILE, json.dumps({"files": self._files, "choice": self.ref.choice, **hub}).encode())
        write_atomically(directory / MANIFEST_FILE, manifest_bytes(manifest))
        (directory / HELD_FILE).unlink(missing_ok=True)
        (root / "last").write_text(self._commit)
        log.info("model %s: %s at commit %s, %d tensors in %d layers", self.ref, ", ".join(chosen), self._commit[:12],
                 len(manifest["tensors"]), len(manifest["layers"]))
        return StoredModel(directory)

    def _last(self, root: Path) -> Path | None:
        try:
            directory = root / (root / "last").read_text().strip()
        except OSError:
            return None
        return directory if (directory / MANIFEST_FILE).is_file() else None

    def _opened(self, directory: Path) -> StoredModel:
        hub = json.loads((directory / HUB_FILE).read_text())
        self._files, self._commit = hub["files"], hub["commit"]
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

        return str(hf_hub_download(self.ref.repo, repo_file, revision=self._commit or None, user_agent=self.user_agent))

    def _read(self, repo_file: str, start: int, length: int) -> bytes:
        """`length` bytes of a repository file from `start` (one range request)."""
        from huggingface_hub.utils import build_hf_headers, get_session

        headers = build_hf_headers(user_agent=self.user_agent)
        headers["Range"] = f"bytes={start}-{start + length - 1}"
        headers["Accept-Encoding"] = "identity"
        try:
            response = get_session().get(self._url(repo_file), headers=headers, follow_redirects=True, timeout=60.0)
        except Exception as e:  # noqa: BLE001 - the transport's errors, named in the message
            raise ModelFetchError(f"{self.ref}: cannot read {repo_file}: {e}") from e
        if response.status_code != 206 or len(response.content) != length:
            raise ModelFetchError(f"{self.ref}: {repo_file} bytes {start}..+{length}: HTTP {response.status_code} with "
                                  f"{len(response.content)} bytes (a server without range requests cannot serve parts)")
        self._count("hub", length)
        return response.content

    def _gguf_header(self, path: Path, repo_file: str, size: int) -> None:
        """Reads the GGUF's first bytes, more each time, until its header parses from them alone."""
        sparse_file(path, b"", size)
        have = 0
        want = min(FIRST_HEADER_BYTES, size)
        while True:
            data = self._read(repo_file, have, want - have)
            with open(path, "r+b") as f:
                f.seek(have)
                f.write(data)
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
        n = int.from_bytes(self._read(repo_file, 0, 8), "little")
        if not 0 < n <= min(size - 8, 100 << 20):
            raise ModelFetchError(f"{self.ref}: {repo_file} declares a {n}-byte header in a {size}-byte file")
        sparse_file(path, n.to_bytes(8, "little") + self._read(repo_file, 8, n), size)

    def _fetch_tensor(self, stored: StoredModel, name: str, where: tuple[Path, int, int]) -> str:
        path, offset, length = where
        repo_file = self._files[path.name]
        fd = os.open(path, os.O_WRONLY)
        try:
            for at in range(0, length, READ_BYTES):
                os.pwrite(fd, self._read(repo_file, offset + at, min(READ_BYTES, length - at)), offset + at)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        return name


def download_whole(ref: HubRef, store: str | os.PathLike[str] | None = None) -> Path:
    """Downloads all of Hub model `ref` into the store (what is there already is kept) and
    returns its directory, for a process that runs every layer."""
    fetcher = HubFetcher(ref, ModelStore(store))
    stored = fetcher.open()
    fetcher.fetch(stored, set(stored.manifest["tensors"]), "the whole model")
    return stored.dir
