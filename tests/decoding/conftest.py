"""Registers ``decode_cases`` (input makers and the reference for decode tests) as a module,
as the top-level conftest does for ``helpers`` (pytest runs with --import-mode=importlib)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if "decode_cases" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("decode_cases", Path(__file__).resolve().parent / "decode_cases.py")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["decode_cases"] = _module
    _spec.loader.exec_module(_module)
