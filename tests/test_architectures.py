"""Which architecture a checkpoint declares picks its family module (meshpy/models/config.py);
one we have no forward pass for fails at load with UnsupportedArchitectureError naming it and
listing the supported ones, for either format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from meshpy.errors import UnsupportedArchitectureError
from meshpy.generation import Model
from meshpy.models.config import SUPPORTED_ARCHITECTURES, read_config
from meshpy.models.source import open_model_source
from tests.conftest import DATA
from tests.fixtures.llama_gguf import finish


def _hf(tmp_path: Path, src: str, **changes: object) -> Path:
    """A copy of a stored tiny checkpoint with config.json keys replaced (None deletes one)."""
    model_dir = tmp_path / src
    shutil.copytree(DATA / src, model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(changes)
    (model_dir / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return model_dir


def _gguf(path: Path, arch: str) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 64), np.float32))
    finish(w)
    return path


def _assert_names_and_lists(err: pytest.ExceptionInfo[UnsupportedArchitectureError], arch: str) -> None:
    message = str(err.value)
    assert f"unsupported architecture {arch!r}" in message
    for supported in SUPPORTED_ARCHITECTURES:
        assert supported in message


def test_supported_list_names_every_family() -> None:
    listed = " ".join(SUPPORTED_ARCHITECTURES)
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM"):
        assert name in listed


@pytest.mark.parametrize("arch", ["GPTNeoXForCausalLM", "MixtralForCausalLM", "Gemma2ForCausalLM"])
def test_hf_architecture_without_a_forward_is_refused(tmp_path: Path, arch: str) -> None:
    model_dir = _hf(tmp_path, "tiny-llama", architectures=[arch])
    with pytest.raises(UnsupportedArchitectureError) as err:
        Model.load(model_dir, threads=1)
    _assert_names_and_lists(err, arch)


def test_hf_model_type_is_the_fallback(tmp_path: Path) -> None:
    """Without `architectures`, `model_type` names it: `mistral` loads, `gpt_neox` does not."""
    cfg = read_config(open_model_source(_hf(tmp_path / "a", "tiny-mistral", architectures=None)))
    assert cfg.layer_sliding == (True, True, True)
    with pytest.raises(UnsupportedArchitectureError) as err:
        read_config(open_model_source(_hf(tmp_path / "b", "tiny-llama", architectures=None, model_type="gpt_neox")))
    _assert_names_and_lists(err, "gpt_neox")


@pytest.mark.parametrize("arch", ["falcon", "gpt2", "gemma2"])
def test_gguf_architecture_without_a_forward_is_refused(tmp_path: Path, arch: str) -> None:
    """`gemma2` too: a relative of a supported family is still refused by name."""
    path = _gguf(tmp_path / f"{arch}.gguf", arch)
    with pytest.raises(UnsupportedArchitectureError) as err:
        Model.load(path, threads=1)
    _assert_names_and_lists(err, arch)
