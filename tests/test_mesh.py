"""The mesh end to end: a bootstrap node and worker processes (the real `meshpy` command) on
127.0.0.1, an End-model client in this process, SmolLM2 Q4_1.

Workers start without --layers and place themselves; the tokens through the mesh must equal
the single-process engine's exactly (f32 hidden states on the wire).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

from meshpy.generation import GenerationStats, Model
from meshpy.mesh import connect
from meshpy.mesh.launcher import LocalMesh
from meshpy.mesh.placement import RUNTIME_OVERHEAD, layer_nbytes
from meshpy.models.config import read_config
from meshpy.models.source import open_model_source
from meshpy.sampling import SamplingParams
from tests.test_speculation import FREE, QUOTING

pytestmark = pytest.mark.slow

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
N_TOKENS = 64
KV_BUDGET = 32 << 20


def greedy(model: Model, prompt: str, n: int) -> list[int]:
    """`n` greedy tokens, not stopping at end-of-turn (so every run compares `n`)."""
    session = model.new_session()
    try:
        logits = model.prefill(session, model.encode(prompt))
        out = []
        for _ in range(n):
            out.append(int(np.argmax(model.end.samplable(logits))))
            logits = model.step(session, out[-1])
        return out
    finally:
        model.close_session(session)


@pytest.fixture(scope="module")
def local_tokens(smollm2_gguf: Path) -> list[int]:
    return greedy(Model.load(smollm2_gguf, threads=1), PROMPT, N_TOKENS)


def ten_layer_memory(gguf: Path) -> int:
    """A --memory that holds 10 of SmolLM2's 30 layers next to the KV budget."""
    source = open_model_source(gguf)
    config = read_config(source)
    layer = max(layer_nbytes(source, config, i) for i in range(config.n_layers))
    return RUNTIME_OVERHEAD + KV_BUDGET + int(10.5 * layer)


@pytest.fixture(scope="module", params=["tcp", "quic"])
def three_workers(request: pytest.FixtureRequest, smollm2_gguf: Path) -> Iterator[LocalMesh]:
    with LocalMesh(transport=request.param) as mesh:
        mesh.start_bootstrap()
        memory = ten_layer_memory(smollm2_gguf)
        for _ in range(3):  # one after another: each reads the coverage the others left
            mesh.add_worker(smollm2_gguf, memory=memory, kv_budget=f"{KV_BUDGET}", threads=1)
        yield mesh


def test_three_workers_place_themselves_and_match_one_process(three_workers: LocalMesh, smollm2_gguf: Path,
                                                              local_tokens: list[int]) -> None:
    mesh = three_workers
    assert [w.layers for w in mesh.workers] == [range(0, 10), range(10, 20), range(20, 30)]
    for w in mesh.workers:
        assert w.wait_for(r"announcing layers \d+-\d+ of smollm2-135m-q4_1@[0-9a-f]{12}")
    with connect(smollm2_gguf, mesh.bootstrap_addr, transport=mesh.transport, threads=1, route_timeout=60) as model:
        route = model.pipeline.route()
        assert [h.layers for h in route] == [range(0, 10), range(10, 20), range(20, 30)]
        # Chained (the default): each step went worker to worker.
        assert greedy(model, PROMPT, N_TOKENS) == local_tokens
        relays = [model.pipeline.node.info(h.provider.peer_id)["relays"] for h in route]
        assert all(n >= N_TOKENS for n in relays), relays
        # Star: each worker a round trip from here, no relay.
        model.pipeline.route_mode = "star"
        assert greedy(model, PROMPT, N_TOKENS) == local_tokens
        assert [model.pipeline.node.info(h.provider.peer_id)["relays"] for h in route] == relays
        model.pipeline.route_mode = "chain"
        # bf16 on the wire rounds hidden states between spans; for this prompt the greedy
        # tokens do not change (f32, the default, is exact by construction).
        model.pipeline.wire_dtype = "bf16"
        assert greedy(model, PROMPT, N_TOKENS) == local_tokens
        model.pipeline.wire_dtype = "f32"
        # Every session was closed on every worker, or kept by the prompt cache until cleared.
        assert all(p.info["sessions"] == model.prompt_cache.sessions for p in model.pipeline.refresh())
        model.prompt_cache.clear()
        assert all(p.info["sessions"] == 0 for p in model.pipeline.refresh())
        # The public path: generate() stops at end of turn, same tokens as far as it goes.
        completion = model.generate(PROMPT, max_tokens=N_TOKENS)
        assert completion.token_ids == local_tokens[: len(completion.token_ids)]
    for w in mesh.workers:
        assert w.wait_for(r"session closed|new session", 5)


def test_concurrent_generations_batch_on_workers_and_each_equals_its_run_alone(three_workers: LocalMesh,
                                                                           smollm2_gguf: Path) -> None:
    """Four greedy generations at once through the mesh: each gives the tokens of the same
    prompt generated alone in one process, and the workers ran some of their steps together
    (their Info counters: fewer span calls than requests)."""
    import threading

    prompts = [f"{PROMPT} Variation {i}: the keeper is {age} years old." for i, age in enumerate((30, 45, 61, 77))]
    local = Model.load(smollm2_gguf, threads=1)
    want = [greedy(local, p, 24) for p in prompts]
    got: list[list[int] | None] = [None] * len(prompts)
    with connect(smollm2_gguf, three_workers.bootstrap_addr, threads=1, route_timeout=60) as model:
        def run(i: int) -> None:
            got[i] = greedy(model, prompts[i], 24)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == want
        infos = [model.pipeline.node.info(p.peer_id) for p in model.pipeline.providers]
    assert any(i["largest_batch"] >= 2 and i["span_calls"] < i["span_entries"] for i in infos), infos
    assert {i["kv_dtype"] for i in infos} == {"f16"}, "the workers' default cache, as the one process's"


def test_speculative_decoding_through_the_mesh_equals_plain(three_workers: LocalMesh, smollm2_gguf: Path) -> None:
    """Drafts verified as extra rows on every worker, rejected ones rewound there (the next
    step starts earlier than a worker holds): the plain one-process tokens, on the chained
    route and the star one."""
    local = Model.load(smollm2_gguf, threads=1)
    local.speculation = False
    quoting, free = local.encode(QUOTING), local.encode(FREE)
    want = [list(local.generate_ids(ids, N_TOKENS)) for ids in (quoting, free)]
    with connect(smollm2_gguf, three_workers.bootstrap_addr, threads=1, route_timeout=60) as model:
        for route in ("chain", "star"):
            model.pipeline.route_mode = route
            model.draft_length = None
            hits, misses = GenerationStats(), GenerationStats()
            assert list(model.generate_ids(quoting, N_TOKENS, stats=hits)) == want[0], route
            model.draft_length = 8  # drafts whatever the odds: most are rejected, so rewound
            assert list(model.generate_ids(free, N_TOKENS, stats=misses)) == want[1], route
            assert hits.accepted_draft_tokens > len(want[0]) // 3, (route, hits)
            assert misses.draft_tokens > misses.accepted_draft_tokens, (route, misses)


def test_status_lists_workers_and_coverage(three_workers: LocalMesh) -> None:
    mesh = three_workers
    out = subprocess.run(
        [sys.executable, "-m", "meshpy", "status", "--bootstrap", mesh.bootstrap_addr, "--transport", mesh.transport],
        capture_output=True, text=True, timeout=120, env=mesh.env, check=True,
    ).stdout
    assert out.startswith("3 worker(s) answering")
    for layers in ("0-9", "10-19", "20-29"):
        assert re.search(rf"smollm2-135m-q4_1@[0-9a-f]{{12}} layers {layers} \(cpu", out), out
    assert "/ip4/127.0.0.1/" in out
    assert re.search(r"model smollm2-135m-q4_1@[0-9a-f]{12} \(30 layers\): every layer has a provider", out)


def test_status_json_gives_the_same_view_as_data(three_workers: LocalMesh) -> None:
    mesh = three_workers
    out = subprocess.run(
        [sys.executable, "-m", "meshpy", "status", "--json", "--bootstrap", mesh.bootstrap_addr, "--transport", mesh.transport],
        capture_output=True, text=True, timeout=120, env=mesh.env, check=True,
    ).stdout
    status = json.loads(out)
    assert (status["answering"], status["silent_workers"], status["end_nodes"]) == (3, 0, [])
    workers = status["workers"]
    assert [(w["first_layer"], w["n_layers"]) for w in workers] == [(0, 10), (10, 10), (20, 10)]
    assert all(w["mode"] == "span" and w["rtt_ms"] > 0 and w["banned_by"] == [] and w["listen_addrs"] for w in workers)
    [model] = status["models"]
    assert re.fullmatch(r"smollm2-135m-q4_1@[0-9a-f]{12}", model["model_id"])
    assert (model["n_layers"], model["uncovered_layers"]) == (30, [])


def test_a_worker_holds_its_layers_not_the_model(three_workers: LocalMesh, smollm2_gguf: Path) -> None:
    """Low memory: resident set <= its layers' weights + its KV budget + 150 MB."""
    for w in three_workers.workers:
        weights = sum(layer_nbytes(open_model_source(smollm2_gguf), read_config(open_model_source(smollm2_gguf)), i)
                      for i in w.layers or ())
        rss, peak = w.rss_bytes(), w.rss_bytes(peak=True)
        print(f"worker {w.layers}: RSS {rss / 2**20:.1f} MiB (peak {peak / 2**20:.1f}), weights {weights / 2**20:.1f} MiB,"
              f" KV budget {KV_BUDGET >> 20} MiB")
        assert rss <= weights + KV_BUDGET + RUNTIME_OVERHEAD


def test_cli_generate_through_the_mesh(three_workers: LocalMesh, smollm2_gguf: Path) -> None:
    mesh = three_workers
    args = ["generate", "--model", str(smollm2_gguf), "--prompt", "What is the capital of France?", "-n", "16",
            "--threads", "1", "--transport", mesh.transport]
    local = subprocess.run([sys.executable, "-m", "meshpy", *args], capture_output=True, text=True, timeout=300,
                           env=mesh.env, check=True)
    remote = subprocess.run([sys.executable, "-m", "meshpy", *args, "--bootstrap", mesh.bootstrap_addr],
                            capture_output=True, text=True, timeout=300, env=mesh.env, check=True)
    assert remote.stdout == local.stdout and "Paris" in remote.stdout
    assert len(re.findall(r"\[provider \S+: layers \d+-\d+", remote.stderr)) == 3
    assert re.search(r"\[route: layers 0-9 on \S+; layers 10-19 on \S+; layers 20-29 on \S+\]", remote.stderr)


def start_with_two_middle_providers(mesh: LocalMesh, gguf: Path, extra: tuple[str, ...] = ()) -> list:
    """A bootstrap node and workers for layers 0-9, 10-19 (two of them, returned, started with
    `extra` arguments) and 20-29."""
    mesh.start_bootstrap()
    mesh.add_worker(gguf, layers="0-9", threads=1)
    middle = [mesh.add_worker(gguf, layers="10-19", threads=1, extra=extra) for _ in range(2)]
    mesh.add_worker(gguf, layers="20-29", threads=1)
    return middle


def greedy_until(model: Model, session, middle: list, n: int) -> tuple[list[int], str, object]:  # noqa: ANN001
    """Prefills PROMPT in `session` and decodes `n` greedy tokens; those tokens, the middle
    hop's provider, and which of the `middle` processes it is."""
    logits = model.prefill(session, model.encode(PROMPT))
    tokens = [int(np.argmax(model.end.samplable(logits)))]
    while len(tokens) < n:
        logits = model.step(session, tokens[-1])
        tokens.append(int(np.argmax(model.end.samplable(logits))))
    on_route = session.hops[1].provider.peer_id
    return tokens, on_route, next(w for w in middle if on_route in "\n".join(w.stdout))


def greedy_on(model: Model, session, tokens: list[int]) -> list[int]:  # noqa: ANN001
    """The greedy tokens after `tokens` in `session`, up to N_TOKENS in all."""
    out = list(tokens)
    while len(out) < N_TOKENS:
        logits = model.step(session, out[-1])
        out.append(int(np.argmax(model.end.samplable(logits))))
    return out[len(tokens):]


def test_a_vanished_worker_is_replaced_mid_generation(smollm2_gguf: Path, local_tokens: list[int]) -> None:
    """Two providers of the middle layers; the one on the route is killed mid-decode. The
    client replays that hop's kept inputs on the other and the tokens do not change."""
    with LocalMesh(transport="tcp") as mesh:
        middle = start_with_two_middle_providers(mesh, smollm2_gguf)
        with connect(smollm2_gguf, mesh.bootstrap_addr, threads=1, route_timeout=60) as model:
            session = model.new_session()
            tokens, on_route, victim = greedy_until(model, session, middle, 21)
            victim.kill()
            tokens += greedy_on(model, session, tokens)
            assert tokens == local_tokens
            assert on_route not in {h.provider.peer_id for h in session.hops}
            model.close_session(session)


def test_sigterm_without_hand_over_lets_a_workers_sessions_finish_and_starts_new_ones_elsewhere(
        smollm2_gguf: Path, local_tokens: list[int]) -> None:
    """The middle provider on a running session's route gets SIGTERM mid-decode, with
    `--no-hand-over`: it withdraws its records and refuses new sessions (the End node starts
    them on the other provider), the running session finishes on it unchanged, and it exits
    cleanly once that session closes. (With hand-over, the default: tests/test_handover.py.)"""
    import signal

    with LocalMesh(transport="tcp") as mesh:
        middle = start_with_two_middle_providers(mesh, smollm2_gguf, extra=("--no-hand-over",))
        with connect(smollm2_gguf, mesh.bootstrap_addr, threads=1, route_timeout=60) as model:
            session = model.new_session()
            tokens, on_route, leaving = greedy_until(model, session, middle, 21)
            leaving.proc.send_signal(signal.SIGTERM)
            leaving.wait_for(r"leaving: no new sessions", 10)
            # A new session meanwhile goes through the other provider: the same tokens.
            assert greedy(model, PROMPT, N_TOKENS) == local_tokens
            tokens += greedy_on(model, session, tokens)
            assert tokens == local_tokens
            assert session.hops[1].provider.peer_id == on_route, "the running session stayed where it was"
            model.close_session(session)
            leaving.wait_for(r"left: 0 sessions handed over, the others ended", 30)
            assert leaving.proc.wait(30) == 0


class _KillAt:
    """A TokenSink that kills the middle provider holding the session when its `at`-th token
    arrives (on the scheduler's thread, so the next step meets the dead worker)."""

    def __init__(self, model: Model, middle: list, at: int) -> None:
        self.model, self.middle, self.at = model, middle, at
        self.tokens: list[int] = []
        self.killed: str | None = None
        self.done = threading.Event()
        self.error: BaseException | None = None

    def token(self, token: int, logprob: object = None) -> bool:
        self.tokens.append(token)
        if len(self.tokens) == self.at:
            busy = {p.peer_id for p in self.model.pipeline.refresh() if p.sessions}
            victim = next(w for w in self.middle if any(peer in "\n".join(w.stdout) for peer in busy))
            self.killed = next(peer for peer in busy if peer in "\n".join(victim.stdout))
            victim.kill()
        return True

    def end(self, finish_reason: str | None, error: BaseException | None) -> None:
        self.error = error
        self.done.set()

    def closed(self) -> None:
        pass


def test_a_vanished_worker_is_replaced_while_drafts_are_rewound(smollm2_gguf: Path) -> None:
    """Eight drafted tokens per match on free text (most rejected, so every hop's kept inputs
    are cut back as caches rewind); the route's middle worker is killed mid-generation: the
    replay on the other provider gives the plain one-process tokens."""
    local = Model.load(smollm2_gguf, threads=1)
    local.speculation = False
    ids = local.encode(FREE)
    want = list(local.generate_ids(ids, N_TOKENS))
    with LocalMesh(transport="tcp") as mesh:
        middle = start_with_two_middle_providers(mesh, smollm2_gguf)
        with connect(smollm2_gguf, mesh.bootstrap_addr, threads=1, route_timeout=60) as model:
            model.draft_length = 8
            sink, stats = _KillAt(model, middle, at=20), GenerationStats(prompt_tokens=len(ids))
            model.submit(ids, N_TOKENS, SamplingParams(), sink, stats)
            assert sink.done.wait(300) and sink.error is None, sink.error
    assert sink.killed is not None
    assert sink.tokens == want[: len(sink.tokens)] and len(sink.tokens) == len(want)
    assert stats.draft_tokens > stats.accepted_draft_tokens, stats


def serve_streams(base_url: str, prompts: list[str], n: int, when_all_decode: Callable[[list[int]], object]) -> list[str]:
    """Greedy chat replies of `n` tokens to every prompt at once, streamed through the openai
    client from the server at `base_url`; once every stream has 4 chunks, `when_all_decode`
    runs on a thread with the chunk counts so far (a list it may copy). The replies' texts."""
    import asyncio
    import time

    import openai

    chunks = [0] * len(prompts)

    async def one(client: openai.AsyncOpenAI, i: int) -> str:
        stream = await client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": prompts[i]}], stream=True,
            temperature=0, max_tokens=n)
        parts = []
        async with stream:
            async for c in stream:
                if c.choices and c.choices[0].delta.content:
                    parts.append(c.choices[0].delta.content)
                    chunks[i] += 1
        return "".join(parts)

    def act() -> None:
        deadline = time.monotonic() + 120
        while min(chunks) < 4:
            if time.monotonic() > deadline:
                return  # a stream failed or stalled: `gather` reports it
            time.sleep(0.005)
        when_all_decode(chunks)

    async def all_streams() -> list[str]:
        async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300) as client:
            actor = asyncio.get_running_loop().run_in_executor(None, act)
            texts = await asyncio.gather(*(one(client, i) for i in range(len(prompts))))
            await actor
            return list(texts)

    return asyncio.run(all_streams())


class ServedMesh(NamedTuple):
    """Prompts, their one-process greedy replies, the two providers of layers 10-19 and the End
    node serving the model through them (`serving_streams`)."""

    prompts: list[str]
    want: list[str]
    middle: list
    model: Model
    server: Any


@contextmanager
def serving_streams(gguf: Path, colors: tuple[str, ...], n: int) -> Iterator[ServedMesh]:
    """PROMPT in one version per color, each one's reply of `n` greedy tokens in one process,
    and an OpenAI server whose End node runs the layers on a mesh with two middle providers."""
    from meshpy.server import AppServer, create_app

    prompts = [f"{PROMPT} In version {i} the bottle is {c}." for i, c in enumerate(colors)]
    local = Model.load(gguf, threads=1)
    want = [local.generate(p, max_tokens=n).text for p in prompts]
    with LocalMesh(transport="tcp") as mesh:
        middle = start_with_two_middle_providers(mesh, gguf)
        with connect(gguf, mesh.bootstrap_addr, threads=1, route_timeout=60) as model, \
                AppServer(create_app(model, "smollm2"), port=0) as server:
            yield ServedMesh(prompts, want, middle, model, server)


def test_a_worker_killed_while_eight_served_streams_run_changes_no_stream(smollm2_gguf: Path) -> None:
    """Eight concurrent greedy chat streams through `create_app` and the openai client, their
    steps batched by the End node's scheduler and on the workers; the middle worker their
    sessions run on is killed mid-decode. The failed iteration falls back to each session's
    own forward, which reroutes and replays, and every stream's text equals the one-process
    reply."""
    n = 64
    with serving_streams(smollm2_gguf, ("green", "blue", "red", "clear", "brown", "white", "black", "gold"), n) as s:
        killed: list[list[int]] = []  # the streams' chunk counts at the kill

        def kill(chunks: list[int]) -> None:
            busy = {p.peer_id for p in s.model.pipeline.refresh() if p.sessions and p.layers.start == 10}
            victim = next(w for w in s.middle if any(peer in "\n".join(w.stdout) for peer in busy))
            victim.kill()
            killed.append(list(chunks))

        got = serve_streams(s.server.base_url, s.prompts, n, kill)
        assert killed and max(killed[0]) < n - 4, f"killed mid-decode: {killed}"
        assert got == s.want
        # The route was chained (the default) and stayed so after the reroute: every
        # worker left, the new middle one included, ran relays.
        assert all(p.info["relays"] > 0 for p in s.model.pipeline.refresh())
        assert s.model.scheduler.counters()[2] >= 2, "the streams shared iterations"


def test_in_process_workers_echo_and_no_route(smollm2_gguf: Path, tmp_path: Path, local_tokens: list[int]) -> None:
    """The Python API: workers started in this process; echo mode; a clear error naming the
    layers nobody serves."""
    from meshpy import _native
    from meshpy.errors import NoRouteError
    from meshpy.mesh import Worker, WorkerSettings

    node = dict(port=0, host="127.0.0.1", transport="tcp")
    with LocalMesh(transport="tcp") as mesh:
        addr = mesh.start_bootstrap()
        with Worker(WorkerSettings(bootstrap=addr, model=None, node_dir=tmp_path / "echo", **node)) as echo:
            assert echo.model is None and echo.layers is None
            client = _native.Node(str(tmp_path / "c"), 0, "tcp", [addr], dht_server=False)
            try:
                client.bootstrap()
                assert client.info(echo.peer_id)["mode"] == "echo"
                x = np.arange(576, dtype=np.float32).reshape(1, 576)
                frame = _native.encode_forward(b"\0" * 32, "any", 0, 1, [(1, 0, 0, 1)], x, "f32")
                np.testing.assert_array_equal(_native.decode_frame(client.request(echo.peer_id, frame))["hidden"], x)
            finally:
                client.close()
        first = Worker(WorkerSettings(bootstrap=addr, model=smollm2_gguf, layers="0-19", threads=1, **node)).start()
        try:
            assert first.layers == range(0, 20)
            with pytest.raises(NoRouteError, match="no worker serves layers 20-29") as info:
                connect(smollm2_gguf, addr, threads=1, route_timeout=1)
            assert info.value.missing_layers == list(range(20, 30))
            with Worker(WorkerSettings(bootstrap=addr, model=smollm2_gguf, memory="1GiB", threads=1, **node)) as second:
                # Placement: the least-covered window that fits; 1 GiB holds every layer.
                assert second.layers == range(0, 30)
                with connect(smollm2_gguf, addr, threads=1, route_timeout=30) as model:
                    assert greedy(model, PROMPT, N_TOKENS) == local_tokens
        finally:
            first.close()


def test_worker_cli_errors(smollm2_gguf: Path) -> None:
    """Bad settings end the worker at once with a message, before it joins anything."""
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "meshpy", "worker", "--host", "127.0.0.1", *args],
                              capture_output=True, text=True, timeout=120)

    r = run("--model", str(smollm2_gguf), "--memory", "100MiB")
    assert r.returncode == 2 and "holds no layer" in r.stderr
    r = run("--model", str(smollm2_gguf), "--layers", "20-40")
    assert r.returncode == 2 and "the model has layers 0-29" in r.stderr
    r = run("--memory", "lots")
    assert r.returncode == 2 and "is not a size" in r.stderr
    r = run("--bootstrap", "/ip4/127.0.0.1/tcp/9")
    assert r.returncode == 2 and "lacks /p2p/" in r.stderr
