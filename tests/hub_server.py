"""A local HTTP server standing in for the Hugging Face Hub (no hub is reachable here): the
endpoints `huggingface_hub` calls to list a repository's files (`/api/models/{repo}`, with
each file's size and LFS SHA-256) and to read a file (`/{repo}/resolve/{revision}/{file}`,
HEAD and GET, with byte ranges as the Hub's CDN answers them). Point nodes at it with
`HF_ENDPOINT`. It records every request, so tests see what each node downloaded.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

__all__ = ["FakeHub", "Served"]


@dataclass
class Served:
    """One request answered: method, repository file, first byte, bytes sent, the client's
    user agent."""

    method: str
    repo: str
    file: str
    start: int
    length: int
    agent: str


@dataclass
class _Repo:
    commit: str
    files: dict[str, Path]
    sha256: dict[str, str] = field(default_factory=dict)
    #: Answer range requests with the whole file, as a server without range support does.
    whole: bool = False


class FakeHub:
    """`add(repo, {name: path})`, then `url` is the endpoint; `served` lists what went out."""

    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        self.served: list[Served] = []
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
                hub._answer(self, body=False)

            def do_GET(self) -> None:  # noqa: N802
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def add(self, repo: str, files: dict[str, Path], commit: str | None = None, whole: bool = False) -> None:
        """Serves `files` as repository `repo` (at `commit`, default a hash of their hashes;
        `whole`: ignoring byte ranges)."""
        sha = {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in files.items()}
        commit = commit or hashlib.sha1(json.dumps(sha, sort_keys=True).encode()).hexdigest()
        self.repos[repo] = _Repo(commit, dict(files), sha, whole)

    def bytes_to(self, agent_part: str, file_suffix: str = "") -> int:
        """Bytes sent in answers to clients whose user agent contains `agent_part`."""
        with self._lock:
            return sum(s.length for s in self.served if agent_part in s.agent and s.file.endswith(file_suffix))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(h.path).path)
        m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?$", path)
        if m and m[1] in self.repos:
            repo = self.repos[m[1]]
            siblings = [{"rfilename": name, "size": p.stat().st_size, "blobId": repo.sha256[name][:40],
                         "lfs": {"sha256": repo.sha256[name], "size": p.stat().st_size, "pointerSize": 134}}
                        for name, p in sorted(repo.files.items())]
            payload = json.dumps({"id": m[1], "modelId": m[1], "sha": repo.commit, "siblings": siblings,
                                  "private": False, "tags": []}).encode()
            return self._send(h, 200, {"Content-Type": "application/json"}, payload if body else b"", len(payload))
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if not m or m[1] not in self.repos or m[3] not in self.repos[m[1]].files:
            return self._send(h, 404, {"X-Error-Code": "EntryNotFound"}, b"not found", 9)
        repo = self.repos[m[1]]
        data_path = repo.files[m[3]]
        size = data_path.stat().st_size
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{repo.sha256[m[3]]}"', "Accept-Ranges": "bytes",
                   "X-Linked-Etag": f'"{repo.sha256[m[3]]}"', "X-Linked-Size": str(size)}
        start, end, status = 0, size - 1, 200
        ranged = re.match(r"^bytes=(\d+)-(\d*)$", h.headers.get("Range", ""))
        if ranged and not repo.whole:
            start = int(ranged[1])
            end = min(int(ranged[2]) if ranged[2] else size - 1, size - 1)
            if start > end:
                return self._send(h, 416, {"Content-Range": f"bytes */{size}"}, b"", 0)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = end - start + 1
        payload = b""
        if body:
            with open(data_path, "rb") as f:
                f.seek(start)
                payload = f.read(length)
            with self._lock:
                self.served.append(Served("GET", m[1], m[3], start, length, h.headers.get("User-Agent", "")))
        self._send(h, status, headers, payload, length)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, headers: dict[str, str], payload: bytes, length: int) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(length))
        h.end_headers()
        if payload:
            h.wfile.write(payload)
