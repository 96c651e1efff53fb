"""`meshpy demo`: the whole thing on one machine. A bootstrap node and workers (real
`meshpy` processes on 127.0.0.1) split the model's layers, this process runs the End model
and the OpenAI-compatible server, and one chat request goes through the official `openai`
client (after a short warm-up request, so the speed it reports is a running mesh's). The
server then stays up, its base URL printed, until Ctrl-C stops everything."""

from __future__ import annotations

import importlib.util
import sys
import threading
import time

from meshpy.cli.serve import served_name
from meshpy.cli.signals import stop_on_sigterm
from meshpy.errors import MeshpyError
from meshpy.generation import model_path
from meshpy.mesh import connect
from meshpy.mesh.launcher import LocalMesh
from meshpy.mesh.placement import format_layers
from meshpy.models.config import read_config
from meshpy.models.source import open_model_source
from meshpy.pipeline import split_layers
from meshpy.settings import DemoSettings

__all__ = ["run_demo"]


def _say(text: str) -> None:
    print(f"[demo] {text}", file=sys.stderr, flush=True)


def run_demo(settings: DemoSettings) -> int:
    """Starts the mesh and the server, sends the demo request, then serves until stopped."""
    from meshpy.server import AppServer, bind, create_app, layer_coverage

    if importlib.util.find_spec("openai") is None:
        # An extra, not a dependency: nothing but the demo uses the client.
        raise MeshpyError("the demo talks to its server through the openai package, which meshpy installs only "
                          "with its demo extra: pip install 'meshpy-llm[demo]' (or: pip install openai)")
    stop_on_sigterm()
    sock = bind(settings.host, settings.port)  # a taken port fails before anything starts
    try:
        path = model_path(settings.model)
        n_layers = read_config(open_model_source(path)).n_layers
        name = served_name(settings.model)
        with LocalMesh(transport="tcp") as mesh:
            _say(f"bootstrap node at {mesh.start_bootstrap()}")
            for layers in split_layers(n_layers, min(settings.workers, n_layers)):
                worker = mesh.add_worker(path, layers=format_layers(layers), threads=settings.threads)
                _say(f"worker {len(mesh.workers)} (pid {worker.pid}) serves layers {format_layers(layers)} of {n_layers}")
            with connect(path, mesh.bootstrap_addr, threads=settings.threads) as model:
                route = "; ".join(str(h) for h in model.pipeline.route())  # type: ignore[attr-defined]
                _say(f"End model here; route: {route}")
                app = create_app(model, name, None, layer_coverage(model))
                with AppServer(app, sock=sock) as server:
                    _say(f"OpenAI-compatible server at {server.base_url}")
                    _say("warming up (one short request: first passes load pages and fill caches)")
                    _warm_up(server.base_url, name)
                    _ask(server.base_url, name, settings)
                    print(f"\nServing {name} at {server.base_url} (any OpenAI client; api_key is not checked).")
                    print(f"  curl {server.base_url}/chat/completions -H 'Content-Type: application/json' "
                          f"-d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hi!\"}}]}}'",
                          flush=True)
                    if not settings.once:
                        print("Ctrl-C stops the server, the workers and the bootstrap node.", flush=True)
                        threading.Event().wait()
    finally:
        sock.close()
    return 0


def _warm_up(base_url: str, name: str) -> None:
    """A short request, not shown: the speed the demo then reports is the one a user gets once
    the processes run, not the first pass's (page faults, cold caches)."""
    import openai

    with openai.OpenAI(base_url=base_url, api_key="meshpy-demo") as client:
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8,
                                       temperature=0)


def _ask(base_url: str, name: str, settings: DemoSettings) -> None:
    """The demo request, streamed to the terminal, then its speed: time to first token, and
    decode tokens/s over the rest of the reply (steady state)."""
    import openai

    with openai.OpenAI(base_url=base_url, api_key="meshpy-demo") as client:
        print(f"> {settings.prompt}", flush=True)
        t0 = time.perf_counter()
        first = None
        usage = None
        stream = client.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": settings.prompt}],
            max_tokens=settings.max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    first = first or time.perf_counter()
                    sys.stdout.write(choice.delta.content)
                    sys.stdout.flush()
    elapsed = time.perf_counter() - t0
    print(flush=True)
    if usage is not None and first is not None:
        decode = elapsed - (first - t0)
        rate = (usage.completion_tokens - 1) / decode if decode > 0 and usage.completion_tokens > 1 else 0.0
        print(f"[{usage.prompt_tokens} prompt tokens, {usage.completion_tokens} generated in {elapsed:.2f} s: "
              f"first token after {first - t0:.2f} s, then {rate:.1f} tok/s]", flush=True)
