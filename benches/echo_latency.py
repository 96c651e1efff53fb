"""Round trip of one decode-sized frame (1 x 576 bf16, SmolLM2's width) through an echo
worker on loopback, over TCP (Noise + Yamux) and QUIC. The worker runs in its own process;
the client is meshpy._native.Node called from Python (GIL released while waiting), timed
three ways, interleaved: the bare frame round trip (`request`, a frame encoded once), the
End node's hop as it was (encode_forward + request + decode_frame to a dict, per call), and
as it is (`Node.forward`: one native call that encodes, waits, checks and decodes).

Usage: PYTHONPATH=python python benches/echo_latency.py [--n 2000] [--warmup 200]
Target (issue 3): p50 under 150 microseconds.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

from meshpy import _native

WORKER = """
import sys
from meshpy import _native
node = _native.Node(sys.argv[1], 0, sys.argv[2], [], "echo")
print(node.listen_addrs()[0], flush=True)
sys.stdin.read()
node.close()
"""


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def measure(transport: str, n: int, warmup: int) -> dict[str, np.ndarray]:
    """Microseconds per call of each way, `n` each after `warmup` rounds."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([p for p in sys.path if p]))
        worker = subprocess.Popen(
            [sys.executable, "-c", WORKER, os.path.join(tmp, "worker"), transport],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )
        try:
            assert worker.stdout is not None
            addr = worker.stdout.readline().strip()
            with _native.Node(os.path.join(tmp, "client"), 0, transport) as client:
                peer = client.dial(addr)
                hidden = np.random.default_rng(0).standard_normal((1, 576), dtype=np.float32)
                model, entries = (b"\x01" * 32, "bench"), [(1, 0, 0, 1)]
                frame = _native.encode_forward(*model, 0, 10, entries, hidden, "bf16")

                def python_hop() -> np.ndarray:
                    f = _native.encode_forward(*model, 0, 10, entries, hidden, "bf16")
                    return _native.decode_frame(client.request(peer, f))["hidden"]

                ways = {
                    "frame round trip": lambda: client.request(peer, frame),
                    "hop, frames in Python": python_hop,
                    "hop, Node.forward": lambda: client.forward(peer, *model, 0, 10, entries, hidden, "bf16"),
                }
                times = {name: np.empty(n) for name in ways}
                for i in range(warmup + n):
                    for name, call in ways.items():
                        t0 = time.perf_counter_ns()
                        call()
                        dt = time.perf_counter_ns() - t0
                        if i >= warmup:
                            times[name][i - warmup] = dt / 1000.0
                assert client.forward(peer, *model, 0, 10, entries, hidden, "bf16").shape == hidden.shape
                return times
        finally:
            if worker.stdin is not None:
                worker.stdin.close()
            worker.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    args = parser.parse_args()
    frame_len = len(_native.encode_forward(b"\x01" * 32, "bench", 0, 10, [(1, 0, 0, 1)], np.zeros((1, 576), np.float32)))
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, {platform.python_implementation()} {platform.python_version()}")
    print(f"commit {commit()}; frame: 1 x 576 bf16 forward ({frame_len} bytes), echo worker in another process")
    for transport in ("tcp", "quic"):
        for name, t in measure(transport, args.n, args.warmup).items():
            p50, p90, p99 = np.percentile(t, [50, 90, 99])
            print(f"{transport:5s} {name:22s} p50 {p50:7.1f} us  p90 {p90:7.1f} us  p99 {p99:7.1f} us  (n={args.n})")


if __name__ == "__main__":
    main()
