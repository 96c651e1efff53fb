"""`meshpy serve`: the OpenAI-compatible server for a model, in this process or on a mesh."""

from __future__ import annotations

import sys
from pathlib import Path

from meshpy.generation import Model
from meshpy.cli.signals import stop_on_sigterm
from meshpy.settings import ServeSettings

__all__ = ["run_serve", "served_name"]


def served_name(model: Path | str) -> str:
    """The model's name in the API: the file or directory name, less `.gguf`
    (`smollm2` for the packaged model)."""
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.name


def _open(settings: ServeSettings) -> Model:
    if settings.bootstrap:
        from meshpy.mesh import connect

        return connect(
            settings.model,
            settings.bootstrap,
            threads=settings.threads,
            transport=settings.transport,
            wire_dtype=settings.wire_dtype,
            route=settings.route,
            network_key=settings.network_key,
            allow_peers=settings.allow_peer,
            store=settings.store,
            node_dir=settings.node_dir,
            route_timeout=settings.route_timeout,
            verify=settings.verify,
            device=settings.device,
        )
    return Model.load(settings.model, threads=settings.threads, quantize=settings.quantize, kv_dtype=settings.kv_dtype,
                      device=settings.device)


def run_serve(settings: ServeSettings) -> int:
    """Opens the model, then serves it until SIGINT or SIGTERM; prints the base URL."""
    from meshpy.server import AppServer, bind, create_app, layer_coverage

    stop_on_sigterm()
    sock = bind(settings.host, settings.port)  # before loading: a taken port fails at once
    try:
        model = _open(settings)
    except BaseException:
        sock.close()
        raise
    model.speculation = settings.speculate
    model.keep_prompts(settings.prompt_cache)
    with model:
        if settings.draft_model is not None:
            model.use_draft_model(settings.draft_model, threads=settings.threads)
        name = settings.model_name or served_name(settings.model)
        app = create_app(
            model, name, settings.api_key, layer_coverage(model), default_max_tokens=settings.max_tokens,
            max_concurrent=settings.max_concurrent, max_waiting=settings.max_waiting,
        )
        server = AppServer(app, sock=sock)
        where = f"layers on the mesh via {settings.bootstrap}" if settings.bootstrap else "in this process"
        print(f"meshpy serve: {name} ({where}); OpenAI base URL:", file=sys.stderr)
        print(server.base_url, flush=True)
        server.serve_forever()
    return 0
