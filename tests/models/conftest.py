"""Registers ``tiny_gguf`` (small Llama GGUF files for the loader's tests) as a module, as the
top-level conftest does for ``helpers`` (pytest runs with --import-mode=importlib)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if "tiny_gguf" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("tiny_gguf", Path(__file__).resolve().parent / "tiny_gguf.py")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["tiny_gguf"] = _module
    _spec.loader.exec_module(_module)
