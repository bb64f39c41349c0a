"""dotattn — exact, fast, memory-efficient scaled dot-product attention.

One public call, :func:`attention`, for NumPy, PyTorch, JAX and TensorFlow arrays, with one
set of semantics (``docs/semantics.md``).  Importing this package imports no framework and no
JIT compiler; backends load on first use.
"""

from __future__ import annotations

from ._version import __version__
from .api import attention, attention_backward
from .blockmask import BlockMask, block_mask
from .decoding import KVCache, attention_with_kvcache
from .errors import (
    AttentionMemoryError,
    AttentionTypeError,
    AttentionValueError,
    DotAttnError,
    ImportOrderError,
    UnsupportedCallError,
)
from .maps import attention_map
from .merge import merge_attention_states
from .nn import MultiHeadAttention


def info() -> list[dict]:
    """Registered backends in dispatch order: ``{"name", "available", "status"}`` each."""
    from . import registry

    return registry.info()


__all__ = [
    "__version__",
    "attention",
    "attention_backward",
    "attention_with_kvcache",
    "KVCache",
    "block_mask",
    "BlockMask",
    "attention_map",
    "merge_attention_states",
    "info",
    "MultiHeadAttention",
    "DotAttnError",
    "AttentionTypeError",
    "AttentionValueError",
    "AttentionMemoryError",
    "UnsupportedCallError",
    "ImportOrderError",
]
