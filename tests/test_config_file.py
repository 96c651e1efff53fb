"""The config file every command reads, and `meshpy init` that writes it, driven as a user
drives it: in a terminal (tmux), answering its questions."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import meshpy
from meshpy.cli import _COMMANDS
from meshpy.config_file import read_config_file
from meshpy.errors import InvalidArgumentError
from meshpy.mesh.launcher import MeshProcess
from meshpy.settings import WorkerSettings, from_namespace
from tests.fixtures.terminal import Terminal

COMMANDS = {name: cls for name, (cls, _t, _h) in _COMMANDS.items() if name != "init"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "meshpy.toml"
    path.write_text(text)
    return path


def test_flag_beats_env_beats_file_beats_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mesh.key").write_text("not read here")
    path = write(tmp_path, """
[mesh]
bootstrap = "/ip4/10.0.0.1/tcp/9000/p2p/12D3KooWAbc"
network-key = "mesh.key"
kv-budget = "1GiB"        # a worker's key: a [mesh] key is read by the commands that have it

[worker]
kv_budget = "512MiB"      # beats [mesh]
port = 9100
idle-timeout = 60
allow-peer = ["12D3KooWOne", "12D3KooWTwo"]
""")
    config = read_config_file(path, "worker", COMMANDS)
    assert config["network_key"] == str(tmp_path / "mesh.key")  # relative to the file's folder
    monkeypatch.delenv("MESHPY_PORT", raising=False)
    monkeypatch.setenv("MESHPY_IDLE_TIMEOUT", "30")
    settings = from_namespace(WorkerSettings, {"port": "9200"}, config)
    assert settings.port == 9200  # the flag
    assert settings.idle_timeout == 30.0  # the environment
    assert settings.kv_budget == "512MiB" and settings.bootstrap == "/ip4/10.0.0.1/tcp/9000/p2p/12D3KooWAbc"
    assert settings.allow_peer == ("12D3KooWOne", "12D3KooWTwo")
    assert settings.drain_timeout == 30.0  # the default
    # The bootstrap node has no kv_budget: the [mesh] key is not its.
    assert "kv_budget" not in read_config_file(path, "bootstrap", COMMANDS)


@pytest.mark.parametrize(("text", "message"), [
    ("[wroker]\nport = 1\n", r"unknown table \[wroker\]; known: mesh, generate"),
    ("[worker]\nkv-budjet = '1GiB'\n", r"\[worker\] has no setting 'kv-budjet'; known: .*kv-budget"),
    ("[mesh]\nno-such-thing = 1\n", r"\[mesh\] has no setting 'no-such-thing'"),
    ("[worker]\nport = \n", r"config file .*meshpy.toml"),
    ("worker = 3\n", r"worker must be a table"),
])
def test_a_wrong_file_is_named_with_the_mistake(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        read_config_file(write(tmp_path, text), "worker", COMMANDS)


def test_a_wrong_value_in_the_file_is_rejected_like_a_flag(tmp_path: Path) -> None:
    config = read_config_file(write(tmp_path, "[worker]\nport = 70000\n"), "worker", COMMANDS)
    with pytest.raises(InvalidArgumentError, match=r"--port: 70000 is outside"):
        from_namespace(WorkerSettings, {}, config)


def cli_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(meshpy.__file__).resolve().parents[1]), env.get("PYTHONPATH")) if p)
    env["MESHPY_DATA_DIR"] = str(tmp_path / "data")
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")  # no user config file leaks in
    env.pop("MESHPY_CONFIG", None)
    return env


def test_the_cli_reads_the_file_and_says_what_is_wrong(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    bad = write(tmp_path, "[worker]\nthreds = 2\n")
    run = subprocess.run([sys.executable, "-m", "meshpy", "worker", "--config", str(bad)], env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 2 and "has no setting 'threds'" in run.stderr, run.stderr
    run = subprocess.run([sys.executable, "-m", "meshpy", "status", "--config", str(tmp_path / "none.toml")], env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 2 and "none.toml does not exist" in run.stderr, run.stderr
    # The default file (under XDG_CONFIG_HOME) is read without --config.
    default = tmp_path / "xdg" / "meshpy" / "config.toml"
    default.parent.mkdir(parents=True)
    default.write_text("[generate]\nprompt = 'Hi'\nmax-tokens = 3\nraw = true\n")
    run = subprocess.run([sys.executable, "-m", "meshpy", "generate", "-m", "smollm2"], env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert "generated 3 tokens" in run.stderr or "finish: stop" in run.stderr


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux; .ci/run installs it)")
def test_init_in_a_terminal_writes_a_config_a_worker_runs(tmp_path: Path, smollm2_gguf: Path) -> None:
    env = cli_env(tmp_path)
    config = tmp_path / "node" / "worker.toml"
    term = Terminal(f"meshpy-init-{os.getpid()}", f"{shlex.quote(sys.executable)} -m meshpy init {shlex.quote(str(config))}", env)
    try:
        term.wait_for(r"What will this machine run\?\n  worker .*\n.*\n  bootstrap .*\nRole \[worker\]:$")
        term.type("wroker")  # a typo is asked again
        term.wait_for(r"answer one of: worker, serve, bootstrap")
        term.type("")  # the default: worker
        term.wait_for(r"Model: .*\[smollm2\]:$")
        term.type(str(tmp_path / "missing.gguf"))
        term.wait_for(r"is no file or directory here")
        term.type(str(smollm2_gguf))
        term.wait_for(r"Address of a mesh node to join.*\[\]:$")
        term.type("")  # none: a mesh of its own (or the LAN's)
        term.wait_for(r"Memory this worker may use.*\[\]:$")
        term.type("lots")
        term.wait_for(r"'lots' is not a size")
        term.type("1GiB")
        term.wait_for(r"Port to listen on.*\[9100\]:$")
        term.type("0")
        term.wait_for(r"Network key:.*\[\]:$")
        term.type("new")
        screen = term.wait_for(r"EXITED \d+")
        assert "EXITED 0" in screen, screen
        assert f"start it with: meshpy worker --config {config}" in screen
    finally:
        term.close()
    key = config.parent / "mesh.key"
    assert key.is_file()
    text = config.read_text()
    assert f'network-key = "{key}"' in text and 'memory = "1GiB"' in text and "port = 0" in text
    # The file runs a worker: it loads the model, announces its layers, and holds the key.
    worker = MeshProcess("worker", ["worker", "--config", str(config), "--host", "127.0.0.1"], env)
    try:
        worker.wait_for(r"announcing layers 0-29 of ", 180)
        addr = worker.wait_for(r"^/ip4/127\.0\.0\.1/tcp/\d+/p2p/\S+$", 10, "stdout").group(0)
        worker.wait_for(r"network key [0-9a-f]+: ", 10)
        # Joining it takes the key: `status` reads the same file's [mesh] key and sees the worker.
        status = subprocess.run([sys.executable, "-m", "meshpy", "status", "--config", str(config), "--bootstrap", addr,
                                 "--json"], env=env, capture_output=True, text=True, timeout=120, check=False)
        assert status.returncode == 0, status.stderr
        assert '"uncovered_layers": []' in status.stdout and '"n_layers": 30' in status.stdout, status.stdout
    finally:
        worker.stop()
