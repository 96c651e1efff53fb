"""Models from the Hugging Face Hub by name (issue 13, part 4), against a local server standing in
for the Hub (`tests/hub_server.py`; `HF_ENDPOINT` points every node at it): resolution by
repository and quantization name, each worker and the End node downloading only its part with
range requests, the store reused on restart, and offline mode. A GGUF repository (the packaged
SmolLM2 file) and a sharded safetensors one (the tiny Llama checkpoint cut into two shards).

Every node is a real process; the End node is `meshpy generate`, whose text is compared with the
one-process engine's on the same weights.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from meshpy.mesh.launcher import LocalMesh
from tests.hub_server import FakeHub

PROMPT = "Name three colors of the rainbow."
TOKENS = 24


@pytest.fixture(scope="module")
def hub(smollm2_gguf: Path, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    from safetensors.numpy import load_file, save_file

    server = FakeHub()
    # A GGUF repository with two quantizations (the second a copy under another name: which
    # file a quantization name picks is what is tested) and a README.
    files = tmp_path_factory.mktemp("gguf-repo")
    (files / "README.md").write_text("# SmolLM2 GGUF\n")
    shutil.copyfile(smollm2_gguf, files / "SmolLM2-135M-Instruct-Q4_1.gguf")
    (files / "SmolLM2-135M-Instruct-Q8_0.gguf").symlink_to(files / "SmolLM2-135M-Instruct-Q4_1.gguf")
    server.add("meshpy-test/SmolLM2-135M-Instruct-GGUF", {p.name: p for p in files.iterdir()})
    # A safetensors repository in two shards with their index.
    shards = tmp_path_factory.mktemp("st-repo")
    tensors = load_file(tiny_llama_dir / "model.safetensors")
    first = {k: v for k, v in tensors.items() if ".layers.0." in k or "embed_tokens" in k}
    rest = {k: v for k, v in tensors.items() if k not in first}
    weight_map = {}
    for i, part in enumerate((first, rest)):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: np.ascontiguousarray(v) for k, v in part.items()}, str(shards / name), metadata={"format": "pt"})
        weight_map |= {k: name for k in part}
    (shards / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_llama_dir / name, shards / name)
    server.add("meshpy-test/tiny-llama", {p.name: p for p in shards.iterdir()})
    yield server
    server.close()


def _env(hub: FakeHub, home: Path, **extra: str) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1", **extra}


def _generate(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`meshpy -v generate ...` (logging what it does)."""
    return subprocess.run([sys.executable, "-m", "meshpy", "-v", "generate", "--prompt", PROMPT, "-n", str(TOKENS), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def _peer(worker) -> str:  # noqa: ANN001 - a MeshProcess
    return worker.wait_for(r"worker (\S+) listening").group(1)


@pytest.mark.slow
def test_gguf_by_quantization_each_node_downloads_its_part(hub: FakeHub, smollm2_gguf: Path, tmp_path: Path) -> None:
    from meshpy import _native

    ckpt = _native.Checkpoint([smollm2_gguf])
    size = {n: ckpt.byte_range(n)[2] - ckpt.byte_range(n)[1] for n in ckpt.tensor_names()}
    header = min(ckpt.byte_range(n)[1] for n in ckpt.tensor_names())

    def share(first: int, last: int) -> int:
        return sum(v for n, v in size.items() if (m := re.match(r"blk\.(\d+)\.", n)) and first <= int(m[1]) <= last)

    with LocalMesh(env=None) as mesh:
        mesh.env.update(_env(hub, tmp_path / "hf"))
        mesh.start_bootstrap()
        spans = [(0, 9), (10, 19), (20, 29)]
        workers = [mesh.add_worker("meshpy-test/SmolLM2-135M-Instruct-GGUF:Q4_1", layers=f"{a}-{b}",
                                   extra=["--store", str(tmp_path / f"w{i}")]) for i, (a, b) in enumerate(spans)]
        for (a, b), worker in zip(spans, workers, strict=True):
            got = hub.bytes_to(_peer(worker))
            print(f"worker {a}-{b}: downloaded {got} bytes; its layers {share(a, b)}, header {header}")
            # Its layers, the small shared tensors, and the header read in growing ranges.
            assert share(a, b) <= got <= (share(a, b) + 2 * header) * 1.05
            assert "SmolLM2-135M-Instruct-Q4_1.gguf" in worker.tail(200)
        end = _generate({**mesh.env}, "--bootstrap", mesh.bootstrap_addr, "--model", "meshpy-test/SmolLM2-135M-Instruct-GGUF:q4_1",
                        "--store", str(tmp_path / "end"))
        assert end.returncode == 0, end.stderr[-3000:]
        local = _generate({**mesh.env}, "--model", str(smollm2_gguf))
        assert end.stdout == local.stdout and end.stdout.strip()
        end_peer = re.search(r"client node (\S+) listening", end.stderr).group(1)  # type: ignore[union-attr]
        end_share = size["token_embd.weight"] + size["output_norm.weight"]
        assert end_share <= hub.bytes_to(end_peer) <= (end_share + 2 * header) * 1.05

        # One process from the Hub name: the whole file, the same text.
        whole = _generate({**mesh.env, "MESHPY_CACHE_DIR": str(tmp_path / "cache")}, "--model",
                          "meshpy-test/SmolLM2-135M-Instruct-GGUF:Q4_1")
        assert whole.returncode == 0 and whole.stdout == local.stdout, whole.stderr[-2000:]

        # Restarted on the same store: nothing downloaded again but the repository listing.
        workers[0].stop()
        again = mesh.add_worker("meshpy-test/SmolLM2-135M-Instruct-GGUF:Q4_1", layers="0-9",
                                extra=["--store", str(tmp_path / "w0")])
        assert hub.bytes_to(_peer(again), ".gguf") == 0


@pytest.mark.slow
def test_a_sharded_safetensors_repo_and_offline_mode(hub: FakeHub, tiny_llama_dir: Path, tmp_path: Path) -> None:
    with LocalMesh(env=None) as mesh:
        mesh.env.update(_env(hub, tmp_path / "hf"))
        mesh.start_bootstrap()
        w0 = mesh.add_worker("meshpy-test/tiny-llama", layers="0-0", extra=["--store", str(tmp_path / "w0")])
        w1 = mesh.add_worker("meshpy-test/tiny-llama", layers="1-2", extra=["--store", str(tmp_path / "w1")])
        # The first worker's layer lives in the first shard: it reads none of the second's tensors.
        shard2 = hub.repos["meshpy-test/tiny-llama"].files["model-00002-of-00002.safetensors"].read_bytes()
        header2 = 8 + int.from_bytes(shard2[:8], "little")
        norm = 64 * 4  # model.norm.weight, the one small shared tensor there
        assert hub.bytes_to(_peer(w0), "00002-of-00002.safetensors") == header2 + norm
        end = _generate({**mesh.env}, "--bootstrap", mesh.bootstrap_addr, "--model", "meshpy-test/tiny-llama",
                        "--store", str(tmp_path / "end"), "--raw")
        assert end.returncode == 0, end.stderr[-3000:]
        local = _generate({**mesh.env}, "--model", str(tiny_llama_dir), "--raw")
        assert end.stdout == local.stdout

        # Offline, with the Hub gone: what the store holds still starts; what it lacks says so.
        hub_url = mesh.env["HF_ENDPOINT"]
        mesh.env.update(HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
        w1.stop()
        mesh.add_worker("meshpy-test/tiny-llama", layers="1-2", extra=["--store", str(tmp_path / "w1")])
        with pytest.raises(Exception, match="exited"):
            mesh.add_worker("meshpy-test/tiny-llama", layers="0-2", extra=["--store", str(tmp_path / "w1")], timeout=60)
        assert "offline (HF_HUB_OFFLINE), and the store lacks" in mesh.workers[-1].tail(30)
        offline = _generate({**mesh.env}, "--bootstrap", mesh.bootstrap_addr, "--model", "meshpy-test/tiny-llama",
                            "--store", str(tmp_path / "end"), "--raw")
        assert offline.returncode == 0 and offline.stdout == local.stdout, offline.stderr[-2000:]
        mesh.env["HF_ENDPOINT"] = hub_url
    del w1


def test_a_hub_that_misbehaves_gets_a_clear_error(hub: FakeHub, smollm2_gguf: Path, tmp_path: Path) -> None:
    """A server that ignores byte ranges is refused before its answer is read (no node takes in
    a whole file it asked a part of); a commit that is not a commit hash never names a
    directory."""
    hub.add("meshpy-test/no-ranges", {"m.gguf": smollm2_gguf}, whole=True)
    hub.add("meshpy-test/evil-commit", {"m.gguf": smollm2_gguf}, commit="../../../outside")
    with LocalMesh(env=None) as mesh:
        mesh.env.update(_env(hub, tmp_path / "hf"))
        mesh.start_bootstrap()
        for repo, why in (("meshpy-test/no-ranges", "must answer range requests"),
                          ("meshpy-test/evil-commit", "no valid commit hash")):
            with pytest.raises(Exception, match="exited"):
                mesh.add_worker(repo, layers="0-9", extra=["--store", str(tmp_path / "w")], timeout=60)
            assert why in mesh.workers[-1].tail(30)
    assert not (tmp_path / "outside").exists()
