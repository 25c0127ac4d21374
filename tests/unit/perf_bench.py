"""Load a benchmark of tests/perf by file, for unit tests of its pure helpers (tests/perf
is no package: each benchmark is a script)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

PERF = Path(__file__).resolve().parents[1] / "perf"


def load(name: str) -> ModuleType:
    """tests/perf/<name>.py as a fresh module (its main() is not run)."""
    spec = importlib.util.spec_from_file_location(name, PERF / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
