"""The config file: one TOML file for every command, so a node's settings live in one place.

```toml
[mesh]                    # read by every command that has the setting
bootstrap = "/ip4/192.168.1.10/tcp/9000/p2p/12D3Koo..."
network-key = "mesh.key"  # relative paths are the file's folder's, when the file is there

[worker]                  # `meshpy worker` only
model = "smollm2"
memory = "2GiB"
port = 9100
```

Keys are the flags' names (`kv-budget`, or `kv_budget`). A flag beats its environment variable,
which beats the file, which beats the default (`settings.from_namespace`). The file is
`--config FILE`, else `$MESHPY_CONFIG`, else `$XDG_CONFIG_HOME/meshpy/config.toml` (by
default `~/.config/meshpy/config.toml`) when it exists, which is where `meshpy init` writes."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_type_hints

from meshpy.errors import InvalidArgumentError

__all__ = ["CONFIG_ENV", "SHARED_TABLE", "default_config_path", "config_path", "read_config_file", "config_table"]

#: Environment variable naming the config file.
CONFIG_ENV = "MESHPY_CONFIG"

#: The table whose keys every command reads (those it has; the rest are other commands').
SHARED_TABLE = "mesh"


def default_config_path() -> Path:
    """`$XDG_CONFIG_HOME/meshpy/config.toml`, by default `~/.config/meshpy/config.toml`."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "meshpy" / "config.toml"


def config_path(given: str | Path | None) -> Path | None:
    """The config file to read: the one given (which must exist), else `$MESHPY_CONFIG`'s
    (which must exist), else the default one if it exists; None when there is none."""
    named = given if given is not None else os.environ.get(CONFIG_ENV) or None
    if named is not None:
        path = Path(named).expanduser()
        if not path.is_file():
            raise InvalidArgumentError(f"config file {path} does not exist")
        return path
    default = default_config_path()
    return default if default.is_file() else None


def read_config_file(path: Path, command: str, commands: Mapping[str, type]) -> dict[str, Any]:
    """The settings `path` gives `command` (a dict of field name -> value): its `[mesh]` keys
    that `command`'s settings have, overridden by its own table's. `commands` maps each command
    to its settings class; a table or key no command knows is an error that names the known
    ones, so a typo does not pass silently."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidArgumentError(f"config file {path}: {exc}") from None
    known_tables = [SHARED_TABLE, *commands]
    for name, table in data.items():
        if name not in known_tables:
            raise InvalidArgumentError(f"config file {path}: unknown table [{name}]; known: {', '.join(known_tables)}")
        if not isinstance(table, dict):
            raise InvalidArgumentError(f"config file {path}: {name} must be a table ([{name}])")
    every_field = {f.name for cls in commands.values() for f in dataclasses.fields(cls)}
    shared = config_table(path, SHARED_TABLE, data.get(SHARED_TABLE, {}), every_field)
    own_fields = {f.name for f in dataclasses.fields(commands[command])}
    own = config_table(path, command, data.get(command, {}), own_fields)
    values = {k: v for k, v in shared.items() if k in own_fields} | own
    return _resolve_paths(values, commands[command], path.parent)


def config_table(path: Path, name: str, table: Mapping[str, Any], fields: set[str]) -> dict[str, Any]:
    """One table's keys as field names (`kv-budget` -> `kv_budget`), each checked against
    `fields`."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        field = key.replace("-", "_")
        if field not in fields:
            known = ", ".join(sorted(f.replace("_", "-") for f in fields))
            raise InvalidArgumentError(f"config file {path}: [{name}] has no setting {key!r}; known: {known}")
        if isinstance(value, dict):
            raise InvalidArgumentError(f"config file {path}: [{name}] {key} must be a value, not a table")
        out[field] = value
    return out


def _resolve_paths(values: dict[str, Any], cls: type, base: Path) -> dict[str, Any]:
    """Relative paths are read from the config file's folder when something is there (a key
    file next to the config); otherwise they stay as written, since a model may also be a
    packaged name or a model id."""
    hints = get_type_hints(cls)
    out = dict(values)
    for name, value in values.items():
        if Path in getattr(hints[name], "__args__", (hints[name],)) and isinstance(value, str):
            candidate = base / Path(value).expanduser()
            if not Path(value).expanduser().is_absolute() and candidate.exists():
                out[name] = str(candidate)
    return out
