"""`meshpy demo` headless: a bootstrap node, two workers and the server on this machine, one
request through the official openai client; everything stops cleanly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

DEMO = [sys.executable, "-m", "meshpy", "demo", "--port", "0", "--threads", "1"]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill 0; it has exited all the same.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("Z")
    except OSError:
        return True


def _worker_pids(stderr: str) -> list[int]:
    pids = [int(p) for p in re.findall(r"worker \d+ \(pid (\d+)\) serves layers", stderr)]
    assert len(pids) == 2, stderr
    return pids


def test_demo_once_answers_and_stops_everything() -> None:
    r = subprocess.run([*DEMO, "--once"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "> Write a short paragraph about Paris" in r.stdout
    assert "[demo] warming up" in r.stderr
    assert "Paris" in r.stdout
    speed = re.search(r"\[\d+ prompt tokens, (\d+) generated in [\d.]+ s: .* tok/s\]", r.stdout)
    assert speed and int(speed.group(1)) >= 32, "the reply is long enough for a steady decode speed"
    assert re.search(r"Serving smollm2 at http://127\.0\.0\.1:\d+/v1", r.stdout)
    assert "serves layers 0-14 of 30" in r.stderr and "serves layers 15-29 of 30" in r.stderr
    for pid in _worker_pids(r.stderr):
        assert _gone(pid)


def test_demo_serves_until_ctrl_c() -> None:
    import openai

    # Ctrl-C as in a terminal, however the tests were started: a shell that runs them in the
    # background (`cmd &`) passes SIGINT on ignored, and the demo would never see it.
    proc = subprocess.Popen(DEMO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        url = None
        for line in proc.stdout:  # type: ignore[union-attr]
            m = re.search(r"Serving smollm2 at (\S+)", line)
            url = m.group(1) if m else url
            if "Ctrl-C stops" in line:
                break
        assert url, "no base URL printed"
        with openai.OpenAI(base_url=url, api_key="x") as client:
            reply = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi!"}],
                                                   max_tokens=8, temperature=0)
        assert reply.choices[0].message.content
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        pids = _worker_pids(err)
        deadline = time.monotonic() + 10
        while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_gone(p) for p in pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
