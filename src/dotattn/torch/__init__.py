"""dotattn for PyTorch: differentiable :func:`attention` on tensors, and layers built on it.

``import dotattn.torch`` imports torch (``import dotattn`` alone never does).  Inside this
package ``import torch`` is an absolute import and finds the real PyTorch, not this package.

* :func:`attention` — ``dotattn.attention`` for torch tensors (it is where
  ``dotattn.attention`` sends them): autograd, ``torch.compile``, every option of
  ``docs/semantics.md``.
* :class:`MultiHeadAttention` — a drop-in for ``torch.nn.MultiheadAttention`` (with
  :meth:`~MultiHeadAttention.from_torch` / :meth:`~MultiHeadAttention.to_torch`), plus GQA.
* :class:`TransformerEncoderLayer`, :class:`TransformerDecoderLayer` — small pre/post-norm
  layers on top of it.

See ``docs/torch.md`` for porting notes from SDPA and ``nn.MultiheadAttention``.
"""

from __future__ import annotations

from .functional import attention
from .layers import MultiHeadAttention, TransformerDecoderLayer, TransformerEncoderLayer

__all__ = ["attention", "MultiHeadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer"]
