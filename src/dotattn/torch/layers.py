"""``nn.Module`` layers on dotattn: multi-head attention and small Transformer layers.

Shape legend: ``B`` batch, ``Lq``/``Lk`` query/key lengths, ``E`` embed dim, ``H``/``Hkv``
query/key-value heads, ``hd = E // H`` head dim.  With ``batch_first=True`` (the default
here; ``nn.MultiheadAttention`` defaults to False) sequences are ``(B, L, E)``, otherwise
``(L, B, E)``; unbatched ``(L, E)`` inputs work either way.

Mask polarity, the one thing to watch when porting: **True = attend / real token** in every
mask of this module (``key_mask``, bool ``attn_mask``), as in SDPA and the rest of dotattn.
``nn.MultiheadAttention``'s ``key_padding_mask`` and bool ``attn_mask`` use True = *ignore*:
pass ``key_mask=~key_padding_mask`` and ``attn_mask=~attn_mask``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import AttentionTypeError, AttentionValueError
from ..semantics import check_flag
from .functional import attention


class MultiHeadAttention(nn.Module):
    """Multi-head attention on dotattn — a drop-in for ``torch.nn.MultiheadAttention``.

    ``y = out_proj(concat_h attention(x W_q,h, key W_k,h, value W_v,h))`` with exact,
    memory-efficient attention (no ``Lq × Lk`` matrix unless ``need_weights=True``).

    Args:
        embed_dim: E, the model width (input and output size of the query side).
        num_heads: H, query heads; ``E`` must be a multiple of it (head dim ``E // H``).
        num_kv_heads: Hkv for grouped-query attention (GQA/MQA); ``H`` must be a multiple of
            it.  Default: ``num_heads`` (ordinary multi-head attention).  K/V are projected
            to ``Hkv`` heads and never repeated in memory.
        bias: add biases to the four projections (as ``nn.MultiheadAttention(bias=...)``).
        kdim, vdim: feature sizes of ``key`` and ``value`` inputs (default ``E``), for
            cross-attention from a memory of another width.
        dropout: dropout on the attention probabilities, applied only in training mode.
        batch_first: inputs/outputs are ``(B, L, E)`` when True (default), ``(L, B, E)``
            when False (``nn.MultiheadAttention``'s default).
        implementation: None (default) lets dotattn pick the backend for each call; a name
            from ``dotattn.info()`` (``"cpu"``, ``"numpy"``, …) forces one.
        device, dtype: where and how to create the parameters.

    Parameters: ``q_proj`` (E→E), ``k_proj`` (kdim→Hkv·hd), ``v_proj`` (vdim→Hkv·hd),
    ``out_proj`` (E→E), all ``nn.Linear``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        dropout: float = 0.0,
        batch_first: bool = True,
        implementation: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise AttentionValueError(
                f"embed_dim must be a positive multiple of num_heads, got embed_dim={embed_dim}, num_heads={num_heads}"
            )
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise AttentionValueError(
                f"num_heads must be a multiple of num_kv_heads, got num_heads={num_heads}, num_kv_heads={num_kv_heads}"
            )
        if not 0.0 <= dropout < 1.0:
            raise AttentionValueError(f"dropout must be in [0, 1), got {dropout}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.dropout = float(dropout)
        self.batch_first = batch_first
        self.implementation = implementation
        kv_width = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, kv_width, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, kv_width, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """As ``nn.MultiheadAttention``: Xavier-uniform input projections, zero biases."""
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"kdim={self.kdim}, vdim={self.vdim}, dropout={self.dropout}, batch_first={self.batch_first}"
        )

    # ---- conversion from/to torch.nn.MultiheadAttention ----------------------------
    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> "MultiHeadAttention":
        """A copy of an ``nn.MultiheadAttention``'s weights and settings (packed or separate
        q/k/v projection weights, bias, kdim/vdim, dropout, batch_first, training mode) that
        gives the same outputs and attention weights.

        Its masks keep torch's polarity; invert them for this module (see the class docs).
        ``add_bias_kv`` and ``add_zero_attn`` have no counterpart and are refused.
        """
        if not isinstance(module, nn.MultiheadAttention):
            raise AttentionTypeError(
                f"from_torch takes a torch.nn.MultiheadAttention, got {type(module).__module__}.{type(module).__name__}"
            )
        if module.bias_k is not None or module.bias_v is not None:
            raise AttentionValueError(
                "from_torch: nn.MultiheadAttention(add_bias_kv=True) appends learned key/value rows, "
                "which dotattn.torch.MultiHeadAttention does not have"
            )
        if module.add_zero_attn:
            raise AttentionValueError(
                "from_torch: nn.MultiheadAttention(add_zero_attn=True) appends a zero key/value row, "
                "which dotattn.torch.MultiHeadAttention does not have"
            )
        ref = module.out_proj.weight
        new = cls(
            module.embed_dim,
            module.num_heads,
            bias=module.in_proj_bias is not None,
            kdim=module.kdim,
            vdim=module.vdim,
            dropout=module.dropout,
            batch_first=module.batch_first,
            device=ref.device,
            dtype=ref.dtype,
        )
        if module._qkv_same_embed_dim:
            weights = module.in_proj_weight.chunk(3)
        else:
            weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
        biases = module.in_proj_bias.chunk(3) if module.in_proj_bias is not None else (None,) * 3
        with torch.no_grad():
            for proj, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases, strict=True):
                proj.weight.copy_(w)
                if b is not None:
                    proj.bias.copy_(b)
            new.out_proj.weight.copy_(module.out_proj.weight)
            if module.out_proj.bias is not None:
                new.out_proj.bias.copy_(module.out_proj.bias)
        new.train(module.training)
        return new

    def to_torch(self) -> nn.MultiheadAttention:
        """An ``nn.MultiheadAttention`` with this module's weights and settings (not for GQA)."""
        if self.num_kv_heads != self.num_heads:
            raise AttentionValueError(
                f"to_torch: nn.MultiheadAttention has no grouped-query attention, but this module has "
                f"num_kv_heads={self.num_kv_heads} < num_heads={self.num_heads}"
            )
        ref = self.out_proj.weight
        has_bias = self.q_proj.bias is not None
        module = nn.MultiheadAttention(
            self.embed_dim,
            self.num_heads,
            dropout=self.dropout,
            bias=has_bias,
            kdim=self.kdim,
            vdim=self.vdim,
            batch_first=self.batch_first,
            device=ref.device,
            dtype=ref.dtype,
        )
        weights = (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)
        with torch.no_grad():
            if module._qkv_same_embed_dim:
                module.in_proj_weight.copy_(torch.cat(weights))
            else:
                separate = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
                for dst, w in zip(separate, weights, strict=True):
                    dst.copy_(w)
            if has_bias:
                module.in_proj_bias.copy_(torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]))
                module.out_proj.bias.copy_(self.out_proj.bias)
            module.out_proj.weight.copy_(self.out_proj.weight)
        module.train(self.training)
        return module

    # ---- forward ------------------------------------------------------------------
    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        key_mask: Tensor | None = None,
        kv_lengths=None,
        attn_mask: Tensor | None = None,
        causal: bool | str = False,
        need_weights: bool = False,
        average_attn_weights: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from ``query`` to ``key``/``value``; returns ``(out, weights or None)``.

        Args:
            query: ``(B, Lq, E)`` (``(Lq, B, E)`` if not ``batch_first``) or unbatched ``(Lq, E)``.
            key: ``(B, Lk, kdim)``; None = ``query`` (self-attention).
            value: ``(B, Lk, vdim)``; None = ``key``.
            key_mask: bool ``(B, Lk)``, **True = real token** (attend), False = padding.
                ``nn.MultiheadAttention``'s ``key_padding_mask`` is the opposite: pass
                ``~key_padding_mask``.
            kv_lengths: int ``(B,)`` real key lengths — padding without a mask.  In
                self-attention (``key`` None) the query rows past the length are padding
                too: their attention output is 0 (so ``out`` there is ``out_proj.bias``).
            attn_mask: bool (True = attend) or float (added to the scores), shaped
                ``(Lq, Lk)``, ``(B·H, Lq, Lk)`` (as ``nn.MultiheadAttention``) or anything
                broadcastable to ``(B, H, Lq, Lk)``.
            causal: False, True / ``"bottom_right"`` (query i sees keys ``j ≤ i + Lk − Lq``)
                or ``"top_left"`` (``j ≤ i``); the same when ``Lq == Lk``.
            need_weights: also return the attention probabilities (materialized, before
                dropout — ``nn.MultiheadAttention`` returns them after dropout).
            average_attn_weights: average the weights over heads: ``(B, Lq, Lk)``;
                otherwise ``(B, H, Lq, Lk)``.  Unbatched inputs drop the ``B`` axis.

        Returns:
            ``out`` shaped as ``query`` (``E`` features) and the weights (or None), in the
            query's dtype.
        """
        if key is None:
            key = query
        if value is None:
            value = key
        self_attention = key is query
        need_weights = check_flag("need_weights", need_weights)
        average_attn_weights = check_flag("average_attn_weights", average_attn_weights)
        given = {"query": tuple(query.shape), "key": tuple(key.shape), "value": tuple(value.shape)}
        unbatched = query.dim() == 2
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise AttentionValueError(
                f"query, key and value must all be 3-D (batched) or 2-D (unbatched), got "
                f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
            )
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_mask = None if key_mask is None else key_mask.unsqueeze(0)
            if attn_mask is not None and attn_mask.dim() == 3:  # (H, Lq, Lk) → (1·H, Lq, Lk)
                attn_mask = attn_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, Lq, Lk = query.shape[0], query.shape[1], key.shape[1]
        for name, x in (("key", key), ("value", value)):
            if x.shape[0] != B:
                raise AttentionValueError(
                    f"query and {name} must have the same batch size, got query{given['query']} and "
                    f"{name}{given[name]} (batch_first={self.batch_first})"
                )
        if value.shape[1] != Lk:
            raise AttentionValueError(
                f"key and value must have the same length Lk, got key{given['key']} and value{given['value']}"
            )

        # (B, L, E) → (B, L, heads, hd): the "blhd" layout, so no transposes are copied.
        q = self.q_proj(query).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.k_proj(key).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = self.v_proj(value).unflatten(-1, (self.num_kv_heads, self.head_dim))
        mask, bias = self._masks(key_mask, attn_mask, B, Lq, Lk)
        result = attention(
            q,
            k,
            v,
            layout="blhd",
            mask=mask,
            bias=bias,
            causal=causal,
            kv_lengths=kv_lengths,
            q_lengths=kv_lengths if (self_attention and kv_lengths is not None) else None,
            dropout_p=self.dropout if self.training else 0.0,
            return_weights=need_weights,
            implementation=self.implementation,
        )
        out, weights = result if need_weights else (result, None)
        out = self.out_proj(out.flatten(-2))  # (B, Lq, E)
        if weights is not None:
            weights = weights.to(out.dtype)  # (B, H, Lq, Lk)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if unbatched:
                weights = weights.squeeze(0)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _masks(self, key_mask, attn_mask, B: int, Lq: int, Lk: int):
        """key_mask and attn_mask → dotattn's ``mask`` (bool, True = attend) and ``bias``."""
        mask = bias = None
        if key_mask is not None:
            if not isinstance(key_mask, Tensor) or key_mask.dtype != torch.bool:
                raise AttentionTypeError(
                    "key_mask must be a bool tensor with True = real token (the opposite of "
                    f"nn.MultiheadAttention's key_padding_mask), got {getattr(key_mask, 'dtype', type(key_mask))}"
                )
            if tuple(key_mask.shape) != (B, Lk):
                raise AttentionValueError(
                    f"key_mask must have shape (B, Lk) = ({B}, {Lk}), got {tuple(key_mask.shape)}"
                )
            mask = key_mask[:, None, None, :]  # (B, 1, 1, Lk)
        if attn_mask is not None:
            if not isinstance(attn_mask, Tensor):
                raise AttentionTypeError(f"attn_mask must be a tensor, got {type(attn_mask).__name__}")
            if attn_mask.dim() == 3:
                if attn_mask.shape[0] != B * self.num_heads:
                    raise AttentionValueError(
                        f"a 3-D attn_mask must have shape (B·H, Lq, Lk) = ({B * self.num_heads}, {Lq}, {Lk}), "
                        f"got {tuple(attn_mask.shape)}"
                    )
                attn_mask = attn_mask.unflatten(0, (B, self.num_heads))
            if attn_mask.dtype == torch.bool:
                mask = attn_mask if mask is None else mask & attn_mask
            elif attn_mask.is_floating_point():
                bias = attn_mask
            else:
                raise AttentionTypeError(
                    f"attn_mask must be bool (True = attend) or floating (added to the scores), got {attn_mask.dtype}"
                )
        return mask, bias


# =================================================================================
# Transformer layers
# =================================================================================

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu}


def _activation(activation: str | Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    if callable(activation):
        return activation
    if activation not in _ACTIVATIONS:
        raise AttentionValueError(f"activation must be 'relu', 'gelu' or a callable, got {activation!r}")
    return _ACTIVATIONS[activation]


def _activation_name(torch_activation) -> str | Callable:
    """nn.Transformer*Layer stores its activation as a function; name the two built-in ones."""
    for name, fn in _ACTIVATIONS.items():
        if torch_activation is fn:
            return name
    return torch_activation


def _copy_modules(dst: nn.Module, src: nn.Module, names: tuple[str, ...]) -> None:
    with torch.no_grad():
        for name in names:
            getattr(dst, name).load_state_dict(getattr(src, name).state_dict())


class _TransformerLayer(nn.Module):
    """What the encoder and decoder layers share: their modules, the feed-forward block and
    ``from_torch``.

    A layer is the attention blocks named in ``ATTENTIONS`` (each a :class:`MultiHeadAttention`
    of ``nhead`` heads over ``d_model``), then the feed-forward block; each block has its own
    norm and residual dropout (``norm1``, ``dropout1``, … in block order).  Modules are named
    and registered in the order of ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``,
    so parameter lists and state dicts line up with torch's.
    """

    ATTENTIONS: tuple[str, ...] = ()

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        *,
        activation: str | Callable[[Tensor], Tensor] = "relu",
        norm_first: bool = False,
        num_kv_heads: int | None = None,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = True,
        bias: bool = True,
        implementation: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        for name in self.ATTENTIONS:
            setattr(self, name, MultiHeadAttention(
                d_model, nhead, num_kv_heads=num_kv_heads, bias=bias, dropout=dropout, batch_first=batch_first,
                implementation=implementation, **factory,
            ))
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
        self.activation = _activation(activation)
        for block in self._blocks():
            setattr(self, f"norm{block}", nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory))
        for block in self._blocks():
            setattr(self, f"dropout{block}", nn.Dropout(dropout))
        self.norm_first = norm_first

    @classmethod
    def _blocks(cls) -> range:
        """The blocks' numbers: one per attention, then the feed-forward block."""
        return range(1, len(cls.ATTENTIONS) + 2)

    def _ff(self, x: Tensor) -> Tensor:
        """linear1 → activation → dropout → linear2."""
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    @classmethod
    def from_torch(cls, layer):
        """A copy of the matching ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``
        (weights, norm order, activation)."""
        ref = layer.linear1.weight
        new = cls(
            layer.linear1.in_features,
            layer.self_attn.num_heads,
            layer.linear1.out_features,
            layer.dropout.p,
            activation=_activation_name(layer.activation),
            norm_first=layer.norm_first,
            layer_norm_eps=layer.norm1.eps,
            batch_first=layer.self_attn.batch_first,
            bias=layer.linear1.bias is not None,
            device=ref.device,
            dtype=ref.dtype,
        )
        for name in cls.ATTENTIONS:
            setattr(new, name, MultiHeadAttention.from_torch(getattr(layer, name)))
        _copy_modules(new, layer, ("linear1", "linear2") + tuple(f"norm{block}" for block in cls._blocks()))
        new.train(layer.training)
        return new


class TransformerEncoderLayer(_TransformerLayer):
    """One Transformer encoder layer: self-attention then a feed-forward block.

    Post-norm (``norm_first=False``, the original Transformer)::

        x = norm1(x + dropout(self_attn(x)));   x = norm2(x + dropout(ff(x)))

    Pre-norm (``norm_first=True``, trains more easily when deep)::

        x = x + dropout(self_attn(norm1(x)));   x = x + dropout(ff(norm2(x)))

    Args:
        d_model: model width E.
        nhead: attention heads H (``d_model`` must be a multiple of it).
        dim_feedforward: hidden width of the feed-forward block (default 2048, as torch).
        dropout: dropout on the attention probabilities, the feed-forward hidden layer and
            both residual branches (training mode only).
        activation: ``"relu"`` (default), ``"gelu"`` or a callable.
        norm_first: pre-norm when True, post-norm when False (default, as torch).
        num_kv_heads: K/V heads for grouped-query attention (default ``nhead``).
        layer_norm_eps: LayerNorm epsilon.
        batch_first: ``(B, L, E)`` when True (default), ``(L, B, E)`` when False.
        bias: biases in the linear layers and LayerNorms.
        implementation: the dotattn backend for the attentions (None = dispatch's choice).
        device, dtype: for the parameters.

    ``forward(src, *, key_mask=None, kv_lengths=None, attn_mask=None, causal=False)``; see
    :meth:`forward`.  Modules (named as in ``nn.TransformerEncoderLayer``): ``self_attn``
    (:class:`MultiHeadAttention`), ``linear1``, ``linear2``, ``norm1``, ``norm2``.
    """

    ATTENTIONS = ("self_attn",)

    def forward(
        self,
        src: Tensor,
        *,
        key_mask: Tensor | None = None,
        kv_lengths=None,
        attn_mask: Tensor | None = None,
        causal: bool | str = False,
    ) -> Tensor:
        """``src`` ``(B, L, E)`` → same shape.

        ``key_mask`` bool ``(B, L)`` True = real token (torch's ``src_key_padding_mask`` is
        the opposite), or ``kv_lengths`` int ``(B,)``; ``attn_mask`` bool (True = attend) or
        additive float; ``causal`` for a decoder-only stack.
        """
        def attend(x):
            y, _ = self.self_attn(x, key_mask=key_mask, kv_lengths=kv_lengths, attn_mask=attn_mask, causal=causal)
            return self.dropout1(y)

        x = src
        if self.norm_first:
            x = x + attend(self.norm1(x))
            x = x + self.dropout2(self._ff(self.norm2(x)))
        else:
            x = self.norm1(x + attend(x))
            x = self.norm2(x + self.dropout2(self._ff(x)))
        return x

class TransformerDecoderLayer(_TransformerLayer):
    """One Transformer decoder layer: causal self-attention, cross-attention to the encoder's
    output (``memory``), then a feed-forward block.

    Post-norm (``norm_first=False``)::

        x = norm1(x + dropout(self_attn(x)))
        x = norm2(x + dropout(cross_attn(x, memory)))
        x = norm3(x + dropout(ff(x)))

    Pre-norm (``norm_first=True``) applies each norm to the branch input instead:
    ``x = x + dropout(block(norm(x)))``.

    Args:
        d_model: model width E (of the target and of ``memory``).
        nhead: attention heads H for both attentions.
        dim_feedforward: hidden width of the feed-forward block (default 2048).
        dropout: dropout on attention probabilities, feed-forward hidden layer and residual
            branches (training mode only).
        activation: ``"relu"`` (default), ``"gelu"`` or a callable.
        norm_first: pre-norm when True, post-norm when False (default).
        num_kv_heads: K/V heads for grouped-query attention in both attentions.
        layer_norm_eps: LayerNorm epsilon.
        batch_first: ``(B, L, E)`` when True (default), ``(L, B, E)`` when False.
        bias: biases in the linear layers and LayerNorms.
        implementation: the dotattn backend for the attentions (None = dispatch's choice).
        device, dtype: for the parameters.

    Modules: ``self_attn``, ``multihead_attn`` (cross-attention; both
    :class:`MultiHeadAttention`), ``linear1``, ``linear2``, ``norm1``–``norm3``.
    """

    ATTENTIONS = ("self_attn", "multihead_attn")  # self-attention, then cross-attention

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        *,
        tgt_key_mask: Tensor | None = None,
        memory_key_mask: Tensor | None = None,
        memory_kv_lengths=None,
        tgt_attn_mask: Tensor | None = None,
        memory_attn_mask: Tensor | None = None,
        causal: bool = True,
        need_weights: bool = False,
        average_attn_weights: bool = True,
    ):
        """``tgt`` ``(B, Lt, E)``, ``memory`` ``(B, Ls, E)`` → ``(B, Lt, E)``.

        Args:
            tgt_key_mask: bool ``(B, Lt)``, True = real target token.
            memory_key_mask: bool ``(B, Ls)``, True = real source token; or
            memory_kv_lengths: int ``(B,)`` real source lengths.
            tgt_attn_mask, memory_attn_mask: extra bool (True = attend) / additive masks.
            causal: target position i sees targets ``≤ i`` (default True; needs no mask).
            need_weights: also return the cross-attention weights (for alignment plots):
                ``(B, Lt, Ls)`` averaged over heads, or ``(B, H, Lt, Ls)`` with
                ``average_attn_weights=False``.

        Returns:
            the new ``tgt``, or ``(tgt, cross_weights)`` with ``need_weights=True``.
        """
        def self_block(x):
            y, _ = self.self_attn(x, key_mask=tgt_key_mask, attn_mask=tgt_attn_mask, causal=causal)
            return self.dropout1(y)

        def cross_block(x):
            y, w = self.multihead_attn(
                x,
                memory,
                key_mask=memory_key_mask,
                kv_lengths=memory_kv_lengths,
                attn_mask=memory_attn_mask,
                need_weights=need_weights,
                average_attn_weights=average_attn_weights,
            )
            return self.dropout2(y), w

        x = tgt
        if self.norm_first:
            x = x + self_block(self.norm1(x))
            y, weights = cross_block(self.norm2(x))
            x = x + y
            x = x + self.dropout3(self._ff(self.norm3(x)))
        else:
            x = self.norm1(x + self_block(x))
            y, weights = cross_block(x)
            x = self.norm2(x + y)
            x = self.norm3(x + self.dropout3(self._ff(x)))
        return (x, weights) if need_weights else x
