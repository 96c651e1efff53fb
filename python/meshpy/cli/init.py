"""`meshpy init`: a few questions (role, model, mesh to join, memory, ports, network key), then
the config file every command reads (see `config_file`). Each answer is checked as the
command itself would check it, and asked again when it is wrong."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w

from meshpy import _native
from meshpy.config_file import SHARED_TABLE, default_config_path
from meshpy.errors import InvalidArgumentError
from meshpy.mesh.nodes import LAN
from meshpy.settings import InitSettings

__all__ = ["run_init"]

#: What each role runs, and what it asks beyond the mesh questions.
ROLES = {
    "worker": "host a range of a model's layers for the mesh",
    "serve": "the End node: an OpenAI-compatible API whose layers run on the mesh",
    "bootstrap": "a rendezvous node others join through (no model)",
}

#: Default node ports: fixed ones, so a firewall rule and other machines' config can name them.
DEFAULT_PORTS = {"worker": 9100, "bootstrap": 9000}


def run_init(settings: InitSettings) -> int:
    """Asks, writes the file, and says how to start the node."""
    path = (settings.path or default_config_path()).expanduser()
    if path.exists() and not settings.force:
        raise InvalidArgumentError(f"{path} exists; pass --force to write over it")
    print(f"meshpy init: a few questions, then the settings go to {path} (Enter takes the [default]).\n")
    role = _ask("What will this machine run?\n" + "".join(f"  {r:<10} {what}\n" for r, what in ROLES.items()) + "Role",
                "worker", _choice(tuple(ROLES)))
    shared: dict[str, Any] = {}
    own: dict[str, Any] = {}
    if role in ("worker", "serve"):
        own["model"] = _ask("Model: a .gguf file, an HF checkpoint directory, a packaged model (smollm2, gemma3-270m), "
                            "a Hub repository (org/repo) or a mesh model id (name@hash)", "smollm2", _model)
    if role != "bootstrap":
        bootstrap = _ask("Address of a mesh node to join (a line `meshpy bootstrap` or a worker prints, "
                         "/ip4/.../p2p/...); empty: find the mesh on this local network", "", _bootstrap)
        if bootstrap:
            shared["bootstrap"] = bootstrap
        elif role == "serve":
            own["bootstrap"] = LAN  # a worker looks there by itself; the End node must be told
    if role == "worker":
        memory = _ask("Memory this worker may use for layers and KV cache (e.g. 4GiB); empty: what is free now", "", _size)
        if memory:
            own["memory"] = memory
    if role in DEFAULT_PORTS:
        own["port"] = _ask("Port to listen on, TCP and UDP (open it in the firewall for other machines)",
                           str(DEFAULT_PORTS[role]), _port)
    else:
        own["host"] = _ask("Address the HTTP API listens on (0.0.0.0: other machines too)", "127.0.0.1", _nonempty)
        own["port"] = _ask("HTTP port", "8000", _port)
    key = _ask("Network key: a key file every node of the mesh holds; 'new' makes one beside the config; "
               "empty: an open mesh", "", _key)
    if key == "new":
        key_path = path.parent / "mesh.key"
        if key_path.exists():
            print(f"  using the key already at {key_path}")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            fingerprint = _native.generate_network_key(str(key_path))
            print(f"  wrote network key {fingerprint} to {key_path}: copy it to every node of the mesh")
        key = str(key_path)
    if key:
        shared["network-key"] = str(Path(key).expanduser().resolve())
    document = {SHARED_TABLE: shared, role: own} if shared else {role: own}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_header(role) + tomli_w.dumps(document))
    flag = "" if path == default_config_path() else f" --config {path}"
    print(f"\nwrote {path}:\n\n{path.read_text()}\nstart it with: meshpy {role}{flag}")
    return 0


def _header(role: str) -> str:
    return (f"# meshpy settings, written by `meshpy init` for `meshpy {role}`. Keys are the flags' names;\n"
            "# a flag or MESHPY_* variable overrides a key; [mesh] applies to every command.\n\n")


def _ask(question: str, default: str, check: Callable[[str], Any]) -> Any:
    """Asks until `check` accepts the answer (or the default, on Enter); returns what it
    returned. End of input is an error, so a script piping too few answers stops clearly."""
    while True:
        print(f"{question} [{default}]: ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            raise InvalidArgumentError("meshpy init: input ended before every question was answered")
        answer = line.strip() or default
        try:
            return check(answer)
        except InvalidArgumentError as exc:
            print(f"  {exc}")


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def check(answer: str) -> str:
        if answer not in options:
            raise InvalidArgumentError(f"answer one of: {', '.join(options)}")
        return answer
    return check


def _model(answer: str) -> str:
    from meshpy.mesh.hub import hub_ref
    from meshpy.mesh.store import model_ref
    from meshpy.models.packaged import PACKAGED_MODELS

    path = Path(answer).expanduser()
    if path.exists():
        return str(path.resolve())
    if answer in PACKAGED_MODELS or hub_ref(answer) is not None:
        return answer
    ref = model_ref(answer)
    if ref is not None and ref.hash_prefix:
        return answer
    raise InvalidArgumentError(f"{answer!r} is no file or directory here, packaged model ({', '.join(PACKAGED_MODELS)}), "
                               "Hub repository or model id")


def _bootstrap(answer: str) -> str:
    from meshpy.mesh.nodes import joins_by_lan, parse_bootstrap

    return LAN if joins_by_lan(answer) else ",".join(parse_bootstrap(answer))


def _size(answer: str) -> str:
    from meshpy.mesh.placement import parse_size

    if answer:
        parse_size(answer)
    return answer


def _port(answer: str) -> int:
    if not answer.isdigit() or not 0 <= int(answer) <= 65535:
        raise InvalidArgumentError(f"{answer!r} is not a port (0 to 65535)")
    return int(answer)


def _nonempty(answer: str) -> str:
    if not answer:
        raise InvalidArgumentError("an answer is needed")
    return answer


def _key(answer: str) -> str:
    if answer in ("", "new"):
        return answer
    path = Path(answer).expanduser()
    if not path.is_file():
        raise InvalidArgumentError(f"{path} is no file (answer 'new' to make a key)")
    return answer
