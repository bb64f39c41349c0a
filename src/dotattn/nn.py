"""``MultiHeadAttention`` on NumPy arrays, built on :func:`dotattn.attention`.

As in "Attention Is All You Need" (Vaswani et al., 2017)::

    MultiHead(Q, K, V) = Concat(head_1, …, head_Hq) · W^O
    head_i             = Attention(Q · W_i^Q, K · W_i^K, V · W_i^V)

Weights multiply from the right (``x @ w``), as in the paper; torch's ``nn.Linear`` stores
the transpose.  Shape legend (see :mod:`dotattn.semantics`)::

    E    embed dim (query input and output)      Ek / Ev  key / value input dims
    Hq   query heads      Hkv  key/value heads   Dh       head dim
    w_q  (E, Hq·Dh)       w_k  (Ek, Hkv·Dh)      w_v      (Ev, Hkv·Dh)      w_o (Hq·Dh, E)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .api import attention
from .errors import AttentionTypeError, AttentionValueError
from .semantics import FLOAT_DTYPES, check_flag, check_seed

__all__ = ["MultiHeadAttention"]


class MultiHeadAttention:
    """Multi-head (grouped-query) attention with input and output projections.

    Args:
        embed_dim: ``E``, the last dim of the query input and of the output.
        num_heads: ``Hq``, query heads.
        num_kv_heads: ``Hkv`` (default ``Hq``); ``Hq % Hkv == 0``.  ``Hkv < Hq`` is
            grouped-query attention (``1`` = multi-query): K/V heads are shared, not copied.
        head_dim: ``Dh`` (default ``E // Hq``, which must then divide exactly).
        kdim, vdim: ``Ek``, ``Ev``, last dims of the key and value inputs (default ``E``).
        bias: whether the four projections add a bias.
        dtype: the parameters' dtype; inputs of another float dtype use the weights cast to theirs.
        seed: the initial weights are a pure function of it (Glorot-uniform, zero biases).

    Call ``mha(query, key=None, value=None, *, causal=False, q_lengths=None,
    kv_lengths=None, mask=None, return_weights=False, implementation=None, **options)``:
    ``query (..., Lq, E)``; ``key (..., Lk, Ek)`` (default: ``query``, self-attention);
    ``value (..., Lk, Ev)`` (default: ``key``).  Returns ``(..., Lq, E)``, and the
    attention weights ``(..., Hq, Lq, Lk)`` with ``return_weights=True``.  ``kv_lengths``
    marks key padding, ``q_lengths`` query padding (those output rows are 0); ``mask`` is
    True = attend (the opposite of ``torch.nn.MultiheadAttention``'s bool masks); other
    ``options`` (window, alibi_slopes, dropout_p, seed, …) go to :func:`dotattn.attention`.
    """

    PARAMETERS = ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o")

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        dtype: Any = np.float32,
        seed: int = 0,
    ) -> None:
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            _check_positive_int(name, value)
        seed = check_seed(seed)
        bias = check_flag("bias", bias)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        _check_positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise AttentionValueError(
                f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}"
            )
        if head_dim is None:
            if embed_dim % num_heads:
                raise AttentionValueError(
                    f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}; pass head_dim explicitly"
                )
            head_dim = embed_dim // num_heads
        _check_positive_int("head_dim", head_dim)
        kdim = embed_dim if kdim is None else kdim
        vdim = embed_dim if vdim is None else vdim
        _check_positive_int("kdim", kdim)
        _check_positive_int("vdim", vdim)
        given = dtype
        try:
            # (None is not a dtype here: np.dtype(None) is float64, which the default is not)
            dtype = np.dtype(dtype) if dtype is not None else None
        except TypeError:  # ("foo", object(): NumPy's "data type 'foo' not understood")
            dtype = None
        if dtype is None or dtype not in FLOAT_DTYPES:  # (`is None` first: a dtype == None is float64's test)
            shown = dtype if dtype is not None else repr(given)
            raise AttentionTypeError(f"dtype must be float16, bfloat16, float32 or float64, got {shown}")

        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim, self.kdim, self.vdim = head_dim, kdim, vdim
        self.bias, self.dtype = bool(bias), dtype
        self._shapes = {
            "w_q": (embed_dim, num_heads * head_dim),
            "w_k": (kdim, num_kv_heads * head_dim),
            "w_v": (vdim, num_kv_heads * head_dim),
            "w_o": (num_heads * head_dim, embed_dim),
        }
        if self.bias:
            self._shapes.update(
                b_q=(num_heads * head_dim,),
                b_k=(num_kv_heads * head_dim,),
                b_v=(num_kv_heads * head_dim,),
                b_o=(embed_dim,),
            )
        self.params: dict[str, np.ndarray] = {}
        rng = np.random.default_rng(seed)
        for name, shape in self._shapes.items():
            if name.startswith("w"):
                limit = math.sqrt(6.0 / (shape[0] + shape[1]))  # Glorot & Bengio (2010) uniform
                self.params[name] = rng.uniform(-limit, limit, shape).astype(dtype)
            else:
                self.params[name] = np.zeros(shape, dtype=dtype)

    # ---- weights ---------------------------------------------------------------
    def set_weights(self, **arrays: Any) -> None:
        """Replace parameters by name (``w_q=…, b_o=…``); each must have its exact shape.  All or
        nothing: every array is checked before any is stored (a refused ``w_k`` left an accepted
        ``w_q`` replaced)."""
        checked = {}
        for name, value in arrays.items():
            if name not in self._shapes:
                known = ", ".join(self._shapes)
                extra = " (this layer was built with bias=False)" if name in self.PARAMETERS else ""
                raise AttentionValueError(f"unknown parameter {name!r}{extra}; parameters are {known}")
            arr = np.asarray(value)
            if not (np.issubdtype(arr.dtype, np.floating) or arr.dtype in FLOAT_DTYPES):
                raise AttentionTypeError(f"{name} must be a float array, got dtype {arr.dtype}")
            if arr.shape != self._shapes[name]:
                raise AttentionValueError(f"{name} must have shape {self._shapes[name]}, got {arr.shape}")
            checked[name] = arr.astype(self.dtype)
        self.params.update(checked)

    def get_weights(self) -> dict[str, np.ndarray]:
        """A copy of every parameter by name."""
        return {name: value.copy() for name, value in self.params.items()}

    # ---- forward ---------------------------------------------------------------
    def _project(self, x: np.ndarray, which: str, heads: int) -> np.ndarray:
        """(..., L, in) → (..., L, heads, Dh): the ``blhd`` layout attention() takes as is."""
        y = x @ self.params[f"w_{which}"].astype(x.dtype, copy=False)
        if self.bias:
            y = y + self.params[f"b_{which}"].astype(x.dtype, copy=False)
        # ml_dtypes' bfloat16 matmul returns float32: keep the input dtype throughout.
        return y.astype(x.dtype, copy=False).reshape(x.shape[:-1] + (heads, self.head_dim))

    def __call__(
        self,
        query: Any,
        key: Any = None,
        value: Any = None,
        *,
        causal: bool | str = False,
        q_lengths: Any = None,
        kv_lengths: Any = None,
        mask: Any = None,
        return_weights: bool = False,
        implementation: str | None = None,
        **options: Any,
    ):
        key = query if key is None else key
        value = key if value is None else value
        query = _check_input("query", query, self.embed_dim, "embed_dim")
        key = _check_input("key", key, self.kdim, "kdim")
        value = _check_input("value", value, self.vdim, "vdim")
        if not (query.dtype == key.dtype == value.dtype):
            raise AttentionTypeError(
                f"query, key and value must share one dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
            )
        if key.shape[:-1] != value.shape[:-1]:
            raise AttentionValueError(
                f"key and value must have the same leading dims (..., Lk), got key{key.shape} and value{value.shape}"
            )
        if query.shape[:-2] != key.shape[:-2]:
            raise AttentionValueError(
                f"query and key must have the same batch dims (everything before (L, features)), got "
                f"query{query.shape} and key{key.shape}"
            )
        q = self._project(query, "q", self.num_heads)  # (..., Lq, Hq, Dh)
        k = self._project(key, "k", self.num_kv_heads)  # (..., Lk, Hkv, Dh)
        v = self._project(value, "v", self.num_kv_heads)  # (..., Lk, Hkv, Dh)
        result = attention(
            q,
            k,
            v,
            layout="blhd",
            causal=causal,
            q_lengths=q_lengths,
            kv_lengths=kv_lengths,
            mask=mask,
            return_weights=return_weights,
            implementation=implementation,
            **options,
        )
        heads, weights = result if return_weights else (result, None)
        concat = heads.reshape(heads.shape[:-2] + (self.num_heads * self.head_dim,))  # (..., Lq, Hq·Dh)
        out = concat @ self.params["w_o"].astype(concat.dtype, copy=False)
        if self.bias:
            out = out + self.params["b_o"].astype(concat.dtype, copy=False)
        out = out.astype(concat.dtype, copy=False)
        if q_lengths is not None:
            # Padded query rows are 0, as attention() gives them, not the output bias.
            Lq = out.shape[-2]
            padded = np.arange(Lq) >= np.asarray(q_lengths)[..., None]  # (..., Lq)
            out = np.where(padded[..., None], np.zeros((), out.dtype), out)
        return (out, weights) if return_weights else out

    def __repr__(self) -> str:
        kv = f", num_kv_heads={self.num_kv_heads}" if self.num_kv_heads != self.num_heads else ""
        return (
            f"MultiHeadAttention(embed_dim={self.embed_dim}, num_heads={self.num_heads}{kv}, "
            f"head_dim={self.head_dim}, bias={self.bias}, dtype={self.dtype})"
        )


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise AttentionTypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise AttentionValueError(f"{name} must be ≥ 1, got {value}")


def _check_input(name: str, x: Any, dim: int, dim_name: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise AttentionTypeError(
            f"{name} must be a numpy.ndarray (MultiHeadAttention is NumPy-only), got {type(x).__name__}"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise AttentionTypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.ndim < 2:
        raise AttentionValueError(f"{name} must have shape (..., L, {dim_name}), got {x.shape}")
    if x.shape[-1] != dim:
        raise AttentionValueError(f"{name} must have last dim {dim_name}={dim}, got shape {x.shape}")
    return x
