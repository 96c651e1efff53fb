"""The OpenAI-compatible HTTP server: `/v1/chat/completions`, `/v1/completions`,
`/v1/models` and `/health` for a model in this process or on a mesh.

>>> from meshpy.server import AppServer, create_app, layer_coverage
>>> model = meshpy.load_model("smollm2")                                  # doctest: +SKIP
>>> with AppServer(create_app(model, "smollm2"), port=0) as server:      # doctest: +SKIP
...     print(server.base_url)   # point any OpenAI client here

`meshpy serve` does the same from the command line.
"""

from __future__ import annotations

from meshpy.server.app import create_app
from meshpy.server.coverage import Coverage, layer_coverage
from meshpy.server.engine import GenerationJob, StopText
from meshpy.server.errors import APIError
from meshpy.server.runner import AppServer, bind

__all__ = ["create_app", "AppServer", "bind", "APIError", "Coverage", "layer_coverage", "GenerationJob", "StopText"]
