"""The mesh's decisions without a network: model identity, layer placement, routes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from meshpy.errors import InvalidArgumentError, NoRouteError
from meshpy.mesh.identity import model_identity
from meshpy.mesh.placement import (
    RUNTIME_OVERHEAD,
    choose_layers,
    format_layers,
    layer_nbytes,
    layers_that_fit,
    parse_layers,
    parse_size,
)
from meshpy.mesh.routing import Provider, coverage_of, plan_route
from meshpy.models.config import read_config
from meshpy.models.source import open_model_source


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHPY_CACHE_DIR", str(tmp_path / "cache"))


def test_identity_is_the_content_not_the_name(tmp_path: Path, tiny_llama_dir: Path) -> None:
    a = tmp_path / "a"
    shutil.copytree(tiny_llama_dir, a)
    first = model_identity(open_model_source(a))
    assert first.name == "llama" and len(first.digest) == 32  # the config's model type, not "a"
    assert first.id == f"llama@{first.digest.hex()[:12]}"
    assert first.layer_key(3) == f"{first.id}/layer/3"
    manifest = first.manifest
    assert len(manifest["layers"]) == read_config(open_model_source(a)).n_layers
    assert all(name.startswith(f"model.layers.{i}.") for i, names in enumerate(manifest["layers"]) for name in names)
    assert "model.embed_tokens.weight" in manifest["shared"]
    # The same files under another directory name: the same model.
    b = tmp_path / "b"
    shutil.copytree(tiny_llama_dir, b)
    assert model_identity(open_model_source(b)) == first
    # One changed weight byte, same size: a different model (the cache notices the file changed).
    weights = next(b.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(1, 1))
    assert model_identity(open_model_source(b)).digest != first.digest
    # A changed config changes it too.
    c = tmp_path / "c"
    shutil.copytree(tiny_llama_dir, c)
    cfg = c / "config.json"
    cfg.write_text(cfg.read_text() + " ")
    assert model_identity(open_model_source(c)).digest != first.digest


def test_a_gguf_is_one_model_under_any_name_and_another_with_one_byte_changed(smollm2_gguf: Path, tmp_path: Path) -> None:
    source = open_model_source(smollm2_gguf)
    first = model_identity(source)
    assert first.name == "smollm2-135m-q4_1"
    cache = tmp_path / "cache" / "tensor-hashes.json"
    assert str(smollm2_gguf.resolve()) in cache.read_text()
    assert model_identity(source) == first
    # A copy under another name, elsewhere: the same id.
    renamed = tmp_path / "elsewhere" / "my-favourite-model.gguf"
    renamed.parent.mkdir()
    shutil.copyfile(smollm2_gguf, renamed)
    assert model_identity(open_model_source(renamed)) == first
    # One byte of one tensor changed: another id.
    ckpt = source.checkpoint
    name = "blk.7.ffn_down.weight"
    data = bytearray(renamed.read_bytes())
    at = data.find(ckpt.tensor_bytes(name)[:64])
    assert at > 0
    data[at + 10] ^= 0x40
    renamed.write_bytes(bytes(data))
    changed = model_identity(open_model_source(renamed))
    assert changed.digest != first.digest
    diff = [n for n, t in changed.manifest["tensors"].items() if t != first.manifest["tensors"][n]]
    assert diff == [name]


def test_sizes_and_layer_ranges() -> None:
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("1.5G") == 1_500_000_000
    assert parse_size("1048576") == 1 << 20
    for bad in ("", "two gigs", "5 parsecs", "-1GiB"):
        with pytest.raises(InvalidArgumentError, match="is not a size"):
            parse_size(bad)
    assert parse_layers("0-7", 30) == range(0, 8)
    assert parse_layers("29", 30) == range(29, 30)
    assert format_layers(range(10, 20)) == "10-19"
    for bad in ("7-3", "0-30", "a-b", "-1"):
        with pytest.raises(InvalidArgumentError):
            parse_layers(bad, 30)


def test_layers_that_fit_the_memory(smollm2_gguf: Path) -> None:
    source = open_model_source(smollm2_gguf)
    config = read_config(source)
    per_layer = [layer_nbytes(source, config, i) for i in range(config.n_layers)]
    # SmolLM2's 30 layers are the whole file less the Q8_0 embedding (tied head), the final
    # norm, and the metadata (tokenizer, ~1.8 MB).
    embedding = 49152 * 576 * 34 // 32
    rest = smollm2_gguf.stat().st_size - sum(per_layer) - embedding - 576 * 4
    assert len(set(per_layer)) == 1 and 1 << 20 < rest < 2 << 20
    kv = 32 << 20
    assert layers_that_fit(per_layer, RUNTIME_OVERHEAD + kv + 10 * max(per_layer) + 1, kv) == 10
    assert layers_that_fit(per_layer, RUNTIME_OVERHEAD + kv, kv) == 0
    assert layers_that_fit(per_layer, 1 << 40, kv) == 30


def test_least_covered_windows_tile_the_model() -> None:
    cover = [0] * 30
    taken = []
    for _ in range(3):
        r = choose_layers(cover, 10)
        taken.append(r)
        for i in r:
            cover[i] += 1
    assert taken == [range(0, 10), range(10, 20), range(20, 30)]
    # Windows that do not divide the model still cover it, overlapping at the end.
    cover = [0] * 30
    for _ in range(3):
        for i in choose_layers(cover, 12):
            cover[i] += 1
    assert min(cover) == 1
    # A fourth worker doubles the least-covered part first.
    assert choose_layers([2] * 10 + [1] * 20, 10) == range(10, 20)
    with pytest.raises(ValueError):
        choose_layers(cover, 31)


def _p(peer: str, first: int, stop: int, rtt: float = 0.001, sessions: int = 0) -> Provider:
    return Provider(peer, range(first, stop), rtt, sessions)


def test_routes_take_the_fewest_hops_then_the_least_busy() -> None:
    providers = [_p("a", 0, 10), _p("b", 10, 20), _p("c", 20, 30), _p("d", 5, 30, sessions=3)]
    hops = plan_route(providers, 0, 30)
    assert [(h.provider.peer_id, h.layers) for h in hops] == [("a", range(0, 10)), ("d", range(10, 30))]
    # Workers run part of their range: d serves 10-29 though it holds 5-29.
    hops = plan_route(providers, 0, 30, exclude={"d"})
    assert [h.provider.peer_id for h in hops] == ["a", "b", "c"]
    # Same reach: fewer sessions, then the shorter round trip.
    twins = [_p("x", 0, 30, rtt=0.002), _p("y", 0, 30, rtt=0.001), _p("z", 0, 30, rtt=0.0001, sessions=1)]
    assert plan_route(twins, 0, 30)[0].provider.peer_id == "y"
    # Part of a route (what a reroute asks for).
    assert [h.layers for h in plan_route(providers, 12, 20, exclude={"d"})] == [range(12, 20)]
    assert coverage_of(providers, 30)[:12] == [1] * 5 + [2] * 5 + [2, 2]


def test_no_route_names_the_missing_layers() -> None:
    with pytest.raises(NoRouteError, match="no worker serves layers 10-19, 25") as info:
        plan_route([_p("a", 0, 10), _p("c", 20, 25), _p("e", 26, 30)], 0, 30)
    assert info.value.missing_layers == list(range(10, 20)) + [25]
    with pytest.raises(NoRouteError, match="layers 0-29"):
        plan_route([], 0, 30)
