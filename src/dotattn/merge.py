"""Merging partial attention results over disjoint key sets, exactly.

Attention over keys ``K = K₁ ∪ K₂ ∪ …`` (disjoint) can be computed part by part: each part
gives its own output ``oᵢ`` (softmax-weighted over its keys only) and log-sum-exp ``lseᵢ``.
The whole is::

    lse = log Σᵢ exp(lseᵢ)            o = Σᵢ exp(lseᵢ − lse) · oᵢ

Split-KV decoding, cascade (shared-prefix) attention and ring attention are all this one step;
it is written once, here.  The step is done with a running maximum so no ``exp`` overflows,
in float32 (float64 for float64 inputs) whatever the parts' dtype — ring-flash-attention
users report error that grows with the number of steps when partial outputs are rounded to
bfloat16 between merges.

A part whose ``lse`` is −inf saw no key and contributes nothing, whatever its output holds
(even NaN); when every part is empty the result is 0 with ``lse = −inf``, the same as a row
with no visible key anywhere in dotattn.  A NaN LSE, or a NaN in a part that has keys, makes
the row NaN (IEEE arithmetic, as the rest of dotattn); so does an LSE of +inf (an overflow
upstream: no finite weight exists), output and LSE both, without a NumPy warning.  A part with
keys weighs > 0 however its weight rounds: where ``exp(lseᵢ − lse)`` underflows to 0, the part's
NaN/±inf entries still reach the row (docs/semantics.md: an underflowed key's ±inf value gives
±inf); its finite entries add 0.

Works on NumPy arrays and PyTorch tensors (differentiable through autograd).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import AttentionTypeError, AttentionValueError
from .frameworks import framework_of
from .kernels._merge import merge_numpy, merge_torch
from .semantics import FLOAT_DTYPES, check_layout, refuse_masked

__all__ = ["merge_attention_states"]


def merge_attention_states(outs: Sequence[Any], lses: Sequence[Any], *, layout: str = "bhld"):
    """Combine partial attention results over disjoint key sets: ``(out, lse)``.

    Shapes (``layout="bhld"``; ``"blhd"`` swaps the L and H axes of each output)::

        outs[i]  (..., Hq, Lq, Dv)       lses[i]  (..., Hq, Lq)       (natural-log LSE)
        out      (..., Hq, Lq, Dv)       lse      (..., Hq, Lq)

    ``lse`` is always ``(..., Hq, Lq)`` whatever ``layout`` says, as everywhere in dotattn.

    Returns ``out`` in the parts' dtype (where the outputs' dtypes differ, the widest: float64
    if one is, else float32 — whatever their order) and ``lse`` in the accumulation dtype
    (float32, or float64 when a part is float64).  Pass float32 parts to keep the merged output unrounded
    for further merges.  NumPy in, NumPy out; torch in, torch out.
    """
    layout = check_layout(layout)
    outs, lses = _check_parts(outs, lses, layout)
    if framework_of(outs[0]) == "torch":
        return merge_torch(outs, lses, layout)
    return merge_numpy(outs, lses, layout)


# =================================================================================
# validation
# =================================================================================


def _check_parts(outs: Any, lses: Any, layout: str) -> tuple[list, list]:
    for name, seq in (("outs", outs), ("lses", lses)):
        if not isinstance(seq, (list, tuple)):
            raise AttentionTypeError(f"{name} must be a list or tuple of arrays, got {type(seq).__name__}")
    if len(outs) == 0:
        raise AttentionValueError("outs must hold at least one partial output, got an empty sequence")
    if len(outs) != len(lses):
        raise AttentionValueError(f"outs and lses must have one entry per part, got {len(outs)} outs and {len(lses)} lses")
    fws = {framework_of(x) for x in list(outs) + list(lses)}
    if None in fws or not fws <= {"numpy", "torch"}:
        bad = next(
            (f"{n}[{i}] is {type(x).__name__}" for n, seq in (("outs", outs), ("lses", lses)) for i, x in enumerate(seq)
             if framework_of(x) not in ("numpy", "torch")),
            "",
        )
        raise AttentionTypeError(f"outs and lses must be NumPy arrays or torch tensors, got {bad}")
    if len(fws) > 1:
        raise AttentionTypeError("outs and lses must all come from one library (NumPy or torch), got a mix")

    torch_parts = fws == {"torch"}
    if torch_parts:  # (before any shape is read: a nested tensor's raises torch's internal error)
        from .torch._convert import check_dense

        for n, seq in (("outs", outs), ("lses", lses)):
            for i, x in enumerate(seq):
                check_dense(f"{n}[{i}]", x)
    out_shape = tuple(outs[0].shape)
    if len(out_shape) < 3:
        raise AttentionValueError(f"outs[0] must have at least 3 dims (..., Hq, Lq, Dv), got shape {out_shape}")
    for i, (o, s) in enumerate(zip(outs, lses)):
        for name, x in ((f"outs[{i}]", o), (f"lses[{i}]", s)):
            if not torch_parts:  # (torch parts: check_dense above)
                refuse_masked(name, x)
            dt = _dtype_of(x)
            # (`is None` first: np.dtype("float64") == None holds, so None would pass `in`)
            if dt is None or dt not in FLOAT_DTYPES:
                raise AttentionTypeError(
                    f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {x.dtype}"
                )
        if tuple(o.shape) != out_shape:
            raise AttentionValueError(f"outs[{i}] has shape {tuple(o.shape)}, but outs[0] has shape {out_shape}")
        want = _lse_shape(out_shape, layout)
        if tuple(s.shape) != want:
            raise AttentionValueError(
                f"lses[{i}] must have shape {want} (the outputs' (..., Hq, Lq)), got {tuple(s.shape)}"
            )
    return list(outs), list(lses)


def _lse_shape(out_shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == "bhld":
        return out_shape[:-1]
    *lead, L, H, _ = out_shape
    return (*lead, H, L)


def _dtype_of(x: Any) -> np.dtype | None:
    if isinstance(x, np.ndarray):
        return x.dtype
    import torch

    names = {torch.float16: "float16", torch.float32: "float32", torch.float64: "float64"}
    if x.dtype == torch.bfloat16:
        return FLOAT_DTYPES[1]
    return np.dtype(names[x.dtype]) if x.dtype in names else None
