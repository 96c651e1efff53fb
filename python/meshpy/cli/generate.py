"""`meshpy generate`: stream one reply to the terminal, then the speeds."""

from __future__ import annotations

import sys
import time

from meshpy.cli.progress import ProgressBar
from meshpy.generation import Model
from meshpy.sampling import SamplingParams
from meshpy.settings import GenerateSettings

__all__ = ["connect_or_load", "run_generate"]


def run_generate(settings: GenerateSettings) -> int:
    """Loads the model, streams the reply to stdout and prints timings to stderr."""
    t0 = time.perf_counter()
    with connect_or_load(settings) as model:
        return _generate(model, settings, time.perf_counter() - t0)


def connect_or_load(settings: GenerateSettings) -> Model:
    """The model as the settings ask: on the mesh (`--bootstrap`) or in this process, with
    its speculation settings and draft model."""
    model = _connect(settings) if settings.bootstrap else _load(settings)
    model.speculation = settings.speculate
    if settings.draft_model is not None:
        try:
            model.use_draft_model(settings.draft_model, threads=settings.threads)
        except BaseException:
            model.close()
            raise
    return model


def _load(settings: GenerateSettings) -> Model:
    """The whole model in this process, with a progress bar."""
    bar = ProgressBar("loading layers", 1)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done)

    try:
        return Model.load(
            settings.model, threads=settings.threads, quantize=settings.quantize, n_spans=settings.spans, progress=progress,
            kv_dtype=settings.kv_dtype, device=settings.device,
        )
    finally:
        bar.close()


def _connect(settings: GenerateSettings) -> Model:
    """The End model here, the layers on the mesh; reports the providers and the route."""
    from meshpy.mesh import connect, describe_route

    model = connect(
        settings.model,
        settings.bootstrap or "",
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
    pipeline = model.pipeline
    for p in pipeline.providers:  # type: ignore[attr-defined]
        print(f"[provider {p.peer_id}: layers {p.layers.start}-{p.layers.stop - 1}, round trip {p.rtt * 1000:.1f} ms]",
              file=sys.stderr)
    print(f"[route: {describe_route(pipeline.route())}]", file=sys.stderr)  # type: ignore[attr-defined]
    return model


def _generate(model: Model, settings: GenerateSettings, load_seconds: float) -> int:
    sampling = SamplingParams(
        temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p, seed=settings.seed
    )
    gen = model.stream(settings.prompt, max_tokens=settings.max_tokens, sampling=sampling, raw=settings.raw)
    for piece in gen:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    s = gen.stats
    print(
        f"[loaded in {load_seconds:.2f} s; prompt {s.prompt_tokens} tokens at {s.prefill_tokens_per_second:.1f} tok/s; "
        f"generated {s.completion_tokens} tokens at {s.decode_tokens_per_second:.1f} tok/s; finish: {s.finish_reason}]",
        file=sys.stderr,
    )
    return 0
