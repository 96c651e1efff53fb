"""Benchmarks. Each script puts the repository on `sys.path` and imports its helpers from
here first, so this runs before any of them imports meshpy: the source tree's package goes
first when its extension is built in place (scripts/develop.sh), not an installed wheel's."""

import sys
from pathlib import Path

_TREE = Path(__file__).resolve().parents[1] / "python"
if any((_TREE / "meshpy").glob("_native*.so")) and str(_TREE) not in sys.path:
    sys.path.insert(0, str(_TREE))
