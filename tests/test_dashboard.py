"""/metrics on every node and the End node's live dashboard, looked at as a user does: the
page loaded in headless Chromium (Debian's `chromium`), its numbers read from the rendered
page and compared with /metrics, and a screenshot taken; the chat box sends a message."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshpy.generation import Model
from meshpy.mesh import connect
from meshpy.mesh.launcher import LocalMesh
from meshpy.server import AppServer, create_app

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def metrics_of(url: str) -> dict[str, float]:
    """Every sample of a /metrics page: `name{label="v",...}` -> value."""
    text = httpx.get(url, timeout=30).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def chromium(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Headless Chromium as root can run (no sandbox), with time for the page's scripts."""
    assert CHROMIUM is not None
    return subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", "--virtual-time-budget=8000", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def mesh_with_server(smollm2_gguf: Path) -> Iterator[tuple[LocalMesh, AppServer, Model, list[str]]]:
    with LocalMesh() as mesh:
        mesh.start_bootstrap()
        urls = []
        for layers in ("0-14", "15-29"):
            worker = mesh.add_worker(smollm2_gguf, layers=layers, threads=1, extra=["--metrics-port", "0"])
            urls.append(worker.wait_for(r"metrics at (http://\S+)", 10).group(1))
        with connect(smollm2_gguf, mesh.bootstrap_addr, threads=1, route_timeout=60) as model:
            with AppServer(create_app(model, "smollm2"), port=0) as server:
                yield mesh, server, model, urls


def test_every_node_serves_metrics(mesh_with_server: tuple[LocalMesh, AppServer, Model, list[str]]) -> None:
    mesh, server, model, worker_urls = mesh_with_server
    with openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as client:
        reply = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=12)
    assert reply.usage is not None
    end = metrics_of(server.url + "/metrics")
    assert end['meshpy_requests_total{route="/v1/chat/completions",status="200"}'] >= 1
    assert end["meshpy_completion_tokens_total"] >= reply.usage.completion_tokens
    assert end["meshpy_time_to_first_token_seconds_count"] >= 1
    assert end["meshpy_inter_token_latency_seconds_count"] >= reply.usage.completion_tokens - 1
    assert end["meshpy_generations_running"] == 0 and end["meshpy_requests_waiting"] == 0
    # The End node's traffic with each worker, counted in Rust, both ways.
    peers = {w.peer_id for w in model.pipeline.refresh()}  # type: ignore[attr-defined]
    for peer in peers:
        assert end[f'meshpy_node_sent_bytes_total{{peer="{peer}"}}'] > 0
        assert end[f'meshpy_node_received_bytes_total{{peer="{peer}"}}'] > 0
    for url, first in zip(worker_urls, (0, 15)):
        worker = metrics_of(url)
        assert worker["meshpy_worker_first_layer"] == first and worker["meshpy_worker_layers"] == 15
        assert worker["meshpy_worker_span_calls_total"] >= 1 and worker["meshpy_worker_span_seconds_total"] > 0
        assert worker["meshpy_worker_kv_budget_bytes"] > 0
        assert any(k.startswith("meshpy_node_received_bytes_total{") and v > 0 for k, v in worker.items())


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
def test_dashboard_in_chromium_shows_what_metrics_say(mesh_with_server: tuple[LocalMesh, AppServer, Model, list[str]],
                                                      tmp_path: Path) -> None:
    mesh, server, model, _ = mesh_with_server
    with openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as client:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Name a color."}], max_tokens=16)
    dom = chromium("--dump-dom", server.url + "/dashboard")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert 'data-loaded="yes"' in page, page[:3000]
    metrics = metrics_of(server.url + "/metrics")

    def shown(element_id: str) -> str:
        m = re.search(rf'id="{element_id}">([^<]*)<', page)
        assert m, f"no #{element_id} on the page"
        return m.group(1)

    assert int(shown("tokens-total")) == int(metrics["meshpy_completion_tokens_total"])
    assert int(shown("running")) == int(metrics["meshpy_generations_running"])
    assert int(shown("waiting")) == int(metrics["meshpy_requests_waiting"])
    assert int(shown("workers-count")) == 2
    # Who hosts which layers: both workers' rows with a measured round trip, every layer
    # covered once.
    rows = re.findall(r'<tr data-peer="([^"]+)">.*?<td>(\d+-\d+)</td>.*?<td class="rtt">([\d.]+) ms</td>', page)
    assert sorted(layers for _, layers, _ in rows) == ["0-14", "15-29"], rows
    assert page.count('data-providers="1"') == 30
    shot = tmp_path / "dashboard.png"
    taken = chromium(f"--screenshot={shot}", "--window-size=1280,900", server.url + "/dashboard")
    assert taken.returncode == 0 and shot.stat().st_size > 10_000, taken.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
def test_dashboard_chat_box_streams_a_reply(mesh_with_server: tuple[LocalMesh, AppServer, Model, list[str]],
                                            tmp_path: Path) -> None:
    """The chat box, driven in the page: a script on a copy of the page types and submits."""
    mesh, server, model, _ = mesh_with_server
    before = metrics_of(server.url + "/metrics").get('meshpy_requests_total{route="/v1/chat/completions",status="200"}', 0)
    page = httpx.get(server.url + "/dashboard").text
    drive = """<script>
window.addEventListener("load", () => setTimeout(() => {
  document.getElementById("chat-input").value = "Say hello.";
  document.getElementById("chat-form").requestSubmit();
}, 500));
</script></body>"""
    # The page as served, plus the typing, from the server's own origin (so fetch reaches it).
    driven = tmp_path / "driven.html"
    driven.write_text(page.replace("</body>", drive).replace('fetch("/', f'fetch("{server.url}/'))
    dom = chromium("--dump-dom", "--allow-file-access-from-files", "--disable-web-security", driven.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    log = re.search(r'id="chat-log">(.*?)</div>', dom.stdout, re.S)
    assert log and "you: Say hello." in log.group(1), dom.stdout[-3000:]
    reply = log.group(1).split("smollm2: ", 1)[1].strip()
    assert reply, log.group(1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = metrics_of(server.url + "/metrics").get('meshpy_requests_total{route="/v1/chat/completions",status="200"}', 0)
        if after > before:
            break
        time.sleep(0.2)
    assert after == before + 1
