"""Checkpoint loading: the native parser against the independent ``gguf`` package on the
packaged real models, corrupt files, safetensors files and directories, and residency."""

from __future__ import annotations

import hashlib

import json
import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from meshpy._native import Checkpoint
from meshpy.errors import (
    CheckpointFormatError,
    CheckpointIOError,
    MissingTensorError,
    ModelSourceError,
    UnsupportedTypeError,
)
from meshpy.models.source import open_model_source


# --------------------------------------------------------------------------------------------
# GGUF against gguf.GGUFReader


def _compare_with_reader(path: Path) -> None:
    reader = gguf.GGUFReader(path)
    ckpt = Checkpoint([path])
    assert ckpt.format == "gguf"
    assert ckpt.paths == [path]

    metadata = ckpt.metadata()
    expected = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert sorted(metadata) == sorted(expected)
    for key, value in expected.items():
        assert metadata[key] == value, key
        assert type(metadata[key]) is type(value), key

    assert ckpt.tensor_names() == sorted(t.name for t in reader.tensors)
    assert len(ckpt) == len(reader.tensors)
    for t in reader.tensors:
        type_name, shape = ckpt.tensor_info(t.name)
        assert type_name == t.tensor_type.name, t.name
        # gguf lists dimensions innermost first; ours are numpy order.
        assert shape == tuple(int(d) for d in reversed(t.shape)), t.name
        assert ckpt.tensor_bytes(t.name) == t.data.tobytes(), t.name


def test_smollm2_matches_gguf_reader(smollm2_gguf: Path) -> None:
    _compare_with_reader(smollm2_gguf)
    ckpt = Checkpoint([str(smollm2_gguf)])
    assert ckpt.tensor_info("blk.0.attn_q.weight") == ("Q4_1", (576, 576))
    assert ckpt.tensor_info("token_embd.weight") == ("Q8_0", (49152, 576))
    assert len(ckpt.metadata()["tokenizer.ggml.tokens"]) == 49152


@pytest.mark.slow
def test_gemma3_matches_gguf_reader(gemma3_gguf: Path) -> None:
    _compare_with_reader(gemma3_gguf)
    ckpt = Checkpoint([gemma3_gguf])
    types = {ckpt.tensor_info(name)[0] for name in ckpt.tensor_names()}
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0", "F32"} <= types


def test_missing_tensor_is_a_key_error_listing_close_names(smollm2_gguf: Path) -> None:
    ckpt = Checkpoint([smollm2_gguf])
    assert "blk.3.attn_q.weight" in ckpt
    with pytest.raises(MissingTensorError) as info:
        ckpt.tensor_bytes("blk.3.attn_qq.weight")
    assert isinstance(info.value, KeyError)
    message = str(info.value)
    assert message.index('"blk.3.attn_q.weight"') < message.index("more")
    with pytest.raises(KeyError):
        ckpt.tensor_info("nope")


# --------------------------------------------------------------------------------------------
# Corrupt GGUF files


def _corrupt_copy(
    src: Path, dst: Path, *, length: int | None = None, patch: dict[int, bytes] | None = None
) -> Path:
    shutil.copyfile(src, dst)
    with dst.open("r+b") as f:
        if length is not None:
            f.truncate(length)
        for offset, data in (patch or {}).items():
            f.seek(offset)
            f.write(data)
    return dst


def test_truncated_header(smollm2_gguf: Path, tmp_path: Path) -> None:
    bad = _corrupt_copy(smollm2_gguf, tmp_path / "cut-header.gguf", length=500_000)
    with pytest.raises(CheckpointFormatError) as info:
        Checkpoint([bad])
    assert str(bad) in str(info.value)
    assert "truncated at byte offset" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_truncated_tensor_data(smollm2_gguf: Path, tmp_path: Path) -> None:
    size = smollm2_gguf.stat().st_size
    bad = _corrupt_copy(smollm2_gguf, tmp_path / "cut-data.gguf", length=size - 1000)
    with pytest.raises(CheckpointFormatError) as info:
        Checkpoint([bad])
    assert str(bad) in str(info.value)
    assert "runs past the end of the file" in str(info.value)


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({0: b"GGML"}, "not a GGUF or safetensors file"),
        ({4: struct.pack("<I", 1)}, "GGUF version 1"),
        ({4: struct.pack("<I", 4)}, "unsupported GGUF version 4"),
        ({4: struct.pack(">I", 3)}, "big-endian"),
    ],
)
def test_bad_magic_and_version(
    smollm2_gguf: Path, tmp_path: Path, patch: dict[int, bytes], expected: str
) -> None:
    bad = _corrupt_copy(smollm2_gguf, tmp_path / "bad.gguf", patch=patch)
    with pytest.raises(CheckpointFormatError) as info:
        Checkpoint([bad])
    assert str(bad) in str(info.value)
    assert expected in str(info.value)


def test_missing_file_is_an_io_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointIOError) as info:
        Checkpoint([tmp_path / "absent.gguf"])
    assert isinstance(info.value, OSError)
    assert "absent.gguf" in str(info.value)


# --------------------------------------------------------------------------------------------
# safetensors


def _write_safetensors(
    path: Path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]], metadata: dict[str, str]
) -> Path:
    """A safetensors file written by hand: 8-byte header length, JSON header, data."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    data = b""
    for name, (dtype, shape, raw) in tensors.items():
        offsets = [len(data), len(data) + len(raw)]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": offsets}
        data += raw
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def _bf16(values: np.ndarray) -> bytes:
    """bfloat16 bytes: the high halves of float32 (truncation)."""
    return (values.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()


def test_safetensors_written_by_the_safetensors_package(tmp_path: Path) -> None:
    st_numpy = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(0)
    arrays = {
        "w32": rng.standard_normal((3, 5)).astype(np.float32),
        "w16": rng.standard_normal((4, 2)).astype(np.float16),
        "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
    }
    path = tmp_path / "weights.bin"  # the format is sniffed, not taken from the name
    st_numpy.save_file(arrays, str(path), metadata={"format": "np"})
    ckpt = Checkpoint([path])
    assert ckpt.format == "safetensors"
    assert ckpt.metadata() == {"format": "np"}
    assert ckpt.tensor_names() == ["ids", "w16", "w32"]
    assert ckpt.tensor_info("w32") == ("F32", (3, 5))
    assert ckpt.tensor_info("w16") == ("F16", (4, 2))
    assert ckpt.tensor_bytes("w32") == arrays["w32"].tobytes()
    assert ckpt.tensor_bytes("w16") == arrays["w16"].tobytes()
    # The int tensor does not stop the file from opening; asking for it does.
    with pytest.raises(UnsupportedTypeError) as info:
        ckpt.tensor_bytes("ids")
    assert "I64" in str(info.value) and '"ids"' in str(info.value)


def test_safetensors_bf16(tmp_path: Path) -> None:
    values = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    tensors = {"e": ("BF16", (2, 4), _bf16(values))}
    bf16 = _write_safetensors(tmp_path / "bf16.safetensors", tensors, {})
    ckpt = Checkpoint([bf16])
    assert ckpt.tensor_info("e") == ("BF16", (2, 4))
    widened = np.frombuffer(ckpt.tensor_bytes("e"), "<u2").astype("<u4") << 16
    np.testing.assert_allclose(widened.view("<f4").reshape(2, 4), values, rtol=2**-7)


def test_safetensors_truncated(tmp_path: Path) -> None:
    path = _write_safetensors(
        tmp_path / "w.safetensors", {"a": ("F32", (4,), np.ones(4, "<f4").tobytes())}, {}
    )
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CheckpointFormatError) as info:
        Checkpoint([path])
    assert str(path) in str(info.value) and '"a"' in str(info.value)


def _hf_dir(directory: Path) -> dict[str, np.ndarray]:
    """A two-shard checkpoint directory with every side file; returns the f32 tensors."""
    rng = np.random.default_rng(1)
    weights = {
        "model.embed_tokens.weight": rng.standard_normal((8, 4)).astype("<f4"),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((6, 4)).astype("<f4"),
        "model.norm.weight": rng.standard_normal(4).astype("<f4"),
    }
    names = list(weights)
    shards = {
        "model-00001-of-00002.safetensors": names[:2],
        "model-00002-of-00002.safetensors": names[2:],
    }
    for shard, members in shards.items():
        _write_safetensors(
            directory / shard,
            {n: ("F32", weights[n].shape, weights[n].tobytes()) for n in members},
            {"format": "pt"},
        )
    weight_map = {n: shard for shard, members in shards.items() for n in members}
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4}))
    (directory / "tokenizer.json").write_text("{}")
    templates = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": templates}))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    return weights


def test_open_model_source_sharded_dir(tmp_path: Path) -> None:
    weights = _hf_dir(tmp_path)
    source = open_model_source(tmp_path)
    assert source.format == "safetensors"
    assert source.path == tmp_path.resolve()
    assert source.config["model_type"] == "llama"
    assert source.metadata == {}
    assert source.tokenizer_json == tmp_path.resolve() / "tokenizer.json"
    assert source.chat_template == "D"  # "default" of tokenizer_config's named templates
    assert source.generation_config == {"eos_token_id": [2, 7]}
    assert source.eos_token_ids == [2, 7]
    assert [p.name for p in source.checkpoint.paths] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert source.checkpoint.tensor_names() == sorted(weights)
    for name, array in weights.items():
        assert source.checkpoint.tensor_bytes(name) == array.tobytes()
    with pytest.raises(AttributeError):
        source.config = {}  # type: ignore[misc]  # frozen

    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    assert open_model_source(tmp_path).chat_template == "{{ messages }}"


def test_open_model_source_single_file_dir(tmp_path: Path) -> None:
    tensors = {"w": ("F16", (2,), b"\x00\x3c\x00\x40")}
    _write_safetensors(tmp_path / "model.safetensors", tensors, {})
    config = {"model_type": "gemma3_text", "eos_token_id": 1}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "C"}))
    source = open_model_source(str(tmp_path))
    assert source.checkpoint.tensor_info("w") == ("F16", (2,))
    assert source.tokenizer_json is None
    assert source.chat_template == "C"
    assert source.generation_config == {}
    assert source.eos_token_ids == [1]


def test_open_model_source_gguf(smollm2_gguf: Path) -> None:
    source = open_model_source(smollm2_gguf)
    reader = gguf.GGUFReader(smollm2_gguf)
    assert source.format == "gguf"
    assert source.config == {} and source.tokenizer_json is None
    assert source.chat_template == reader.fields["tokenizer.chat_template"].contents()
    assert source.metadata["llama.block_count"] == 30
    assert source.eos_token_ids == [2]


def test_open_model_source_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError) as info:
        open_model_source(tmp_path / "nowhere")
    assert isinstance(info.value, FileNotFoundError) and "nowhere" in str(info.value)

    (tmp_path / "README.md").write_text("hi")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelSourceError) as info:
        open_model_source(tmp_path)
    assert "no weights" in str(info.value) and "README.md" in str(info.value)

    _hf_dir(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelSourceError) as info:
        open_model_source(tmp_path)
    assert "model-00002-of-00002.safetensors" in str(info.value) and "missing" in str(info.value)

    _hf_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointFormatError) as info:
        open_model_source(tmp_path)
    assert str(tmp_path.resolve() / "config.json") in str(info.value)

    _hf_dir(tmp_path)
    index = tmp_path / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    weight_map["lm_head.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointFormatError) as info:
        open_model_source(tmp_path)
    assert "lm_head.weight" in str(info.value)


# --------------------------------------------------------------------------------------------
# Residency


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_reading_three_layers_keeps_most_of_the_file_out_of_memory(smollm2_gguf: Path) -> None:
    """Opening maps the file without reading it; reading 3 of 30 layers (via the ``touch``
    test hook, which reads in place without copying) must not make the whole file resident.
    Touching every tensor afterwards must, which shows the measurement can see it."""
    size = smollm2_gguf.stat().st_size
    before = _rss_bytes()
    ckpt = Checkpoint([smollm2_gguf])
    layers = [n for n in ckpt.tensor_names() if n.startswith(("blk.0.", "blk.1.", "blk.2."))]
    assert len(layers) == 27
    ckpt.touch(layers)
    after_layers = _rss_bytes()
    assert after_layers - before < 0.4 * size, (after_layers - before, size)

    ckpt.touch(ckpt.tensor_names())
    after_all = _rss_bytes()
    assert after_all - before > 0.8 * size, (after_all - before, size)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_hashing_every_tensor_leaves_the_file_out_of_memory(smollm2_gguf: Path) -> None:
    """A model's id hashes every tensor (meshpy/mesh/identity.py): in place and dropping the
    pages after each, so a worker that hashes a file far larger than its share does not end
    up holding it all (measured before: a 17 GB MoE file left 12 GB resident in the worker
    that hashed it). The hashes equal hashlib's of the bytes."""
    size = smollm2_gguf.stat().st_size
    ckpt = Checkpoint([smollm2_gguf])
    before = _rss_bytes()
    hashes = {name: ckpt.tensor_sha256(name) for name in ckpt.tensor_names()}
    assert _rss_bytes() - before < 0.3 * size, (_rss_bytes() - before, size)
    for name in ckpt.tensor_names()[:20]:
        assert hashes[name] == hashlib.sha256(ckpt.tensor_bytes(name)).hexdigest()


def test_stub_matches_the_native_class() -> None:
    """The ``# checkpoint`` block of _native.pyi names exactly the public members."""
    import ast

    import meshpy

    stub = ast.parse((Path(meshpy.__file__).parent / "_native.pyi").read_text())
    (cls,) = [n for n in stub.body if isinstance(n, ast.ClassDef) and n.name == "Checkpoint"]
    stubbed = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)} - {"__init__"}
    public = {n for n in dir(Checkpoint) if not n.startswith("_")} | {"__len__", "__contains__"}
    assert stubbed == public
