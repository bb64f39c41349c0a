"""Packaging basics: the public names, the version in one place, typing marker, lazy imports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import dotattn

ROOT = Path(__file__).resolve().parents[1]


def test_all_names_exist_and_are_documented():
    assert len(set(dotattn.__all__)) == len(dotattn.__all__)
    for name in dotattn.__all__:
        obj = getattr(dotattn, name)
        if callable(obj):
            assert obj.__doc__, f"dotattn.{name} has no docstring"


def test_version_has_one_source():
    from dotattn import _version

    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)?", dotattn.__version__)
    assert dotattn.__version__ == _version.__version__
    assert "dynamic" in (ROOT / "pyproject.toml").read_text() and "dotattn._version.__version__" in (
        ROOT / "pyproject.toml"
    ).read_text()


def test_py_typed_is_shipped():
    assert (Path(dotattn.__file__).parent / "py.typed").exists()


def test_import_loads_no_backend_and_no_jit():
    # Plain-Python helpers below the kernels (block-mask classes, the options structure) may
    # load; no backend module and no JIT compiler may.
    code = (
        "import json, sys, dotattn; from dotattn import registry; "
        "backends = {m for m, _ in registry._SPECS.values()}; "
        "print(json.dumps(sorted(m for m in sys.modules if m in ('numba', 'llvmlite') or m in backends "
        "or m.startswith(('dotattn.kernels.cpu', 'dotattn.kernels._cpu_kernels', 'dotattn.kernels.triton')))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
