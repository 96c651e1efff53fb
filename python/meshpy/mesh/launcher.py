"""A mesh on this machine: a bootstrap node and workers as child processes, each the real
`meshpy` command, for tests, benchmarks and the demo.

>>> with LocalMesh(transport="tcp") as mesh:                       # doctest: +SKIP
...     mesh.start_bootstrap()
...     mesh.add_worker(model="smollm2", layers="0-14")
...     mesh.add_worker(model="smollm2", layers="15-29")
...     model = meshpy.mesh.connect("smollm2", mesh.bootstrap_addr)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import meshpy
from meshpy.errors import MeshpyError

__all__ = ["MeshProcess", "LocalMesh"]

#: A worker's log line once it serves and has announced its layers.
_ANNOUNCED = re.compile(r"announcing layers (\d+)-(\d+) of (\S+)|echo mode")


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies, so a crashed test or demo
    leaves no workers behind (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


class MeshProcess:
    """One `meshpy` child process; its output lines are collected as they come."""

    def __init__(self, name: str, args: Sequence[str], env: dict[str, str] | None = None, prefix: Sequence[str] = ()) -> None:
        """Runs `meshpy ARGS`; `prefix` goes before the interpreter (`ip netns exec NS` runs it
        on another network)."""
        self.name = name
        self.args = [*prefix, sys.executable, "-m", "meshpy", *args]
        self.proc = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        #: A worker's layers, once it has announced them.
        self.layers: range | None = None
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._collect, args=(stream, lines), daemon=True)
            for stream, lines in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr))
        ]
        for t in self._readers:
            t.start()

    def _collect(self, stream, lines: list[str]) -> None:  # noqa: ANN001 - a text pipe
        for line in stream:
            with self._changed:
                lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 60.0, stream: str = "any") -> re.Match[str]:
        """The first output line matching `pattern`; raises if the process exits first or
        `timeout` passes."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                sources = {"stdout": [self.stdout], "stderr": [self.stderr], "any": [self.stdout, self.stderr]}[stream]
                for lines in sources:
                    for line in lines:
                        m = regex.search(line)
                        if m:
                            return m
                if self.proc.poll() is not None:
                    time.sleep(0.1)  # let the readers drain
                    raise MeshpyError(f"{self.name} exited ({self.proc.returncode}) before {regex.pattern!r}:\n{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MeshpyError(f"{self.name}: no {regex.pattern!r} within {timeout:.0f} s:\n{self.tail()}")
                self._changed.wait(min(left, 0.5))

    def tail(self, n: int = 30) -> str:
        """The last output lines, for error messages."""
        return "\n".join((self.stdout + self.stderr)[-n:])

    def rss_bytes(self, peak: bool = False) -> int:
        """Resident set size now (or its peak), from /proc (Linux)."""
        key = "VmHWM:" if peak else "VmRSS:"
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        raise MeshpyError(f"no {key} for {self.name}")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM (a clean exit: announcements withdrawn), then SIGKILL after `timeout`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_pipes()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: the process vanishes mid-whatever, as a crashed machine would."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for t in self._readers:
            t.join(5.0)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


class LocalMesh:
    """A bootstrap node and workers on this machine, listening on `host`."""

    def __init__(self, transport: str = "tcp", host: str = "127.0.0.1", env: dict[str, str] | None = None) -> None:
        self.transport = transport
        self.host = host
        self._tmp = tempfile.TemporaryDirectory(prefix="meshpy-local-")
        self.env = dict(os.environ if env is None else env)
        # Identities in the temporary directory; the hash cache stays the user's.
        self.env["MESHPY_DATA_DIR"] = self._tmp.name
        # The processes run the meshpy this one imported (a source tree's, not an installed
        # wheel's that happens to be on the path).
        package_root = str(Path(meshpy.__file__).resolve().parents[1])
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, self.env.get("PYTHONPATH")) if p)
        self.bootstrap: MeshProcess | None = None
        self.bootstrap_addr = ""
        self.workers: list[MeshProcess] = []

    def _node_args(self) -> list[str]:
        return ["--port", "0", "--host", self.host, "--transport", self.transport]

    def start_bootstrap(self, timeout: float = 60.0) -> str:
        """Starts the bootstrap node; its multiaddr for the mesh's transport."""
        self.bootstrap = MeshProcess("bootstrap", ["bootstrap", *self._node_args()], self.env)
        marker = "/quic-v1/p2p/" if self.transport == "quic" else "/tcp/"
        self.bootstrap_addr = self.bootstrap.wait_for(rf"^/\S*{re.escape(marker)}\S*$", timeout, "stdout").group(0)
        return self.bootstrap_addr

    def add_worker(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        layers: str | None = None,
        memory: int | str | None = None,
        kv_budget: str = "64MiB",
        threads: int | None = None,
        extra: Sequence[str] = (),
        env: dict[str, str] | None = None,
        timeout: float = 120.0,
        prefix: Sequence[str] = (),
    ) -> MeshProcess:
        """Starts a worker joined to the bootstrap node (with `env` added to the mesh's
        environment, `prefix` before the interpreter); returns once it has announced."""
        args = ["worker", *self._node_args(), "--bootstrap", self.bootstrap_addr, "--kv-budget", kv_budget]
        for flag, value in (("--model", model), ("--layers", layers), ("--memory", memory), ("--threads", threads)):
            if value is not None:
                args += [flag, str(value)]
        worker = MeshProcess(f"worker {len(self.workers)}", [*args, *extra], {**self.env, **(env or {})}, prefix=prefix)
        self.workers.append(worker)
        m = worker.wait_for(_ANNOUNCED, timeout)
        worker.layers = range(int(m.group(1)), int(m.group(2)) + 1) if m.group(1) else None
        return worker

    def close(self) -> None:
        """Stops every process (workers first) and removes the identities."""
        for p in [*self.workers, *([self.bootstrap] if self.bootstrap else [])]:
            p.stop()
        self._tmp.cleanup()

    def __enter__(self) -> LocalMesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
