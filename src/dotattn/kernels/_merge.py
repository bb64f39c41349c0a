"""The exact merge of partial attention results, below its users.

:func:`dotattn.merge_attention_states` (public: validates, then calls these) and the split-KV
decode kernels (which merge their own, well-formed parts) share this one step; see
:mod:`dotattn.merge` for the definition, the −inf and NaN rules and why accumulation is
float32/float64.  ``outs[i] (..., Hq, Lq, Dv)`` (``"blhd"``: ``(..., Lq, Hq, Dv)``),
``lses[i] (..., Hq, Lq)``; NumPy arrays in :func:`merge_numpy`, torch tensors in
:func:`merge_torch`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["merge_numpy", "merge_torch"]


# =================================================================================
# the merge, once per library
# =================================================================================


def merge_numpy(outs: list[np.ndarray], lses: list[np.ndarray], layout: str):
    acc = np.float64 if any(x.dtype == np.float64 for x in outs + lses) else np.float32
    lse = np.stack([s.astype(acc, copy=False) for s in lses])  # (P, ..., Hq, Lq)
    with np.errstate(invalid="ignore"):
        m = lse.max(axis=0)
    m_safe = np.where(np.isneginf(m), 0.0, m).astype(acc)  # all-empty rows: avoid −inf − −inf
    with np.errstate(invalid="ignore"):  # an LSE of +inf: inf − inf is NaN, which poisons its row
        w = np.exp(lse - m_safe)  # 0 for empty parts
    total = w.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        merged_lse = (m_safe + np.log(total)).astype(acc)  # log 0 = −inf for all-empty rows
    scale = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
    if np.isnan(total).any():  # a NaN LSE poisons its row (np.divide's where= skipped it)
        scale = np.where(np.isnan(total), np.nan, scale)
    out = np.zeros(outs[0].shape, dtype=acc)
    # Each part is weighed into the accumulator in blocks of rows (the last axis whole), each
    # converted to ``acc`` as the product reads it: until 6 Dec 2026 every part was converted
    # whole (``astype``: a float32 copy of each 16-bit part) beside a full-size product buffer —
    # 8.3 parts' worth of memory at the peak for 16-bit parts, where the accumulator and the
    # result are 3 (tests/decoding/test_decode_memory.py).  The same elementwise operations on
    # the same values: the same bits.
    rows = out.reshape(-1, out.shape[-1]) if out.size else None
    block = max(1, _MERGE_BLOCK_BYTES // max(1, out.shape[-1] * out.itemsize))
    # one block: the part whole (a small merge — a prompt pass's tile — skips the row views,
    # ≈ 40 µs of a 2-part merge of 9 × 64 rows; the same products)
    whole = rows is not None and rows.shape[0] <= block
    product = np.empty((min(block, rows.shape[0]), out.shape[-1]), dtype=acc) if rows is not None else None
    for part, wi, empty in zip(outs, scale, np.isneginf(lse)):
        wi, empty = _as_out_axes(wi, layout), _as_out_axes(empty, layout)
        if rows is None:
            continue
        if whole and (wi != 0).all():
            np.multiply(wi, part, out=product.reshape(out.shape), dtype=acc)
            out += product.reshape(out.shape)
            continue
        if (wi != 0).all():  # the usual case: every row of the part weighs, w·x as it is
            w_rows = np.broadcast_to(wi, out.shape[:-1] + (1,)).reshape(-1, 1)  # (small: one per row)
            x_rows = part.reshape(-1, part.shape[-1])  # (a copy only for a part that no view can flatten)
            for r0 in range(0, rows.shape[0], block):
                r1 = min(r0 + block, rows.shape[0])
                p = product[: r1 - r0]
                np.multiply(w_rows[r0:r1], x_rows[r0:r1], out=p, dtype=acc)
                rows[r0:r1] += p
            continue
        x = part.astype(acc, copy=False)
        # a part with keys weighs > 0 however its weight rounds: where it underflows to 0, its
        # NaN/±inf entries still reach the row (docs/semantics.md); an empty part never does
        with np.errstate(invalid="ignore"):  # 0·inf where the weight underflowed: the where drops it
            out += np.where(wi != 0, wi * x, np.where(empty | np.isfinite(x), 0.0, x))
    return out.astype(_out_dtype([x.dtype for x in outs], np.float64, np.float32), copy=False), merged_lse


# Rows of the accumulator weighed per step of merge_numpy's loop (≈ 1 MiB of it: the product's
# block stays in L2, and a part's conversion never allocates more).
_MERGE_BLOCK_BYTES = 1 << 20


def merge_torch(outs: list, lses: list, layout: str):
    import torch

    acc = torch.float64 if any(x.dtype == torch.float64 for x in outs + lses) else torch.float32
    lse = torch.stack([s.to(acc) for s in lses])
    m = lse.max(dim=0).values
    m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    w = torch.exp(lse - m_safe)
    total = w.sum(dim=0)
    # log of 1, not of 0, for rows with no part (then −inf): log's gradient at 0 is inf, and
    # inf · 0 made the gradient of those rows' LSE inputs NaN (the rows' gradient is 0); a NaN
    # total stays NaN
    empty_row = total == 0
    merged_lse = torch.where(empty_row, float("-inf"), m_safe + torch.log(torch.where(empty_row, 1.0, total)))
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    scale = torch.where(total > 0, w / safe_total, torch.zeros_like(w))
    scale = torch.where(torch.isnan(total), torch.full_like(scale, float("nan")), scale)
    out = torch.zeros(outs[0].shape, dtype=acc, device=outs[0].device)
    zero = torch.zeros((), dtype=acc, device=outs[0].device)
    if outs[0].device.type == "cpu" and not (
        torch.is_grad_enabled() and any(t.requires_grad for t in list(outs) + list(lses))
    ):
        return _merge_torch_in_place(outs, scale, torch.isneginf(lse), out, zero, layout), merged_lse
    for part, wi, empty in zip(outs, scale, torch.isneginf(lse)):
        wi, empty = _as_out_axes(wi, layout), _as_out_axes(empty, layout)
        x = part.to(acc)
        # as merge_numpy: an underflowed weight still carries a part's NaN/±inf, an empty part's never.
        # The product takes x only where it is kept: where() passes a zero gradient to the branch
        # it drops, and 0 · NaN (an empty part's NaN/inf output) made the row's LSE gradients NaN.
        kept = torch.where(wi != 0, x, zero)
        out = out + torch.where(wi != 0, wi * kept, torch.where(empty | torch.isfinite(x), zero, x))
    return out.to(_out_dtype([x.dtype for x in outs], torch.float64, torch.float32)), merged_lse


def _merge_torch_in_place(outs: list, scale, empties, out, zero, layout: str):
    """:func:`merge_torch`'s weighted sum for CPU tensors without autograd: into ``out`` in place,
    in blocks of rows as :func:`merge_numpy` — each part converted to ``out``'s dtype as the
    product reads it.  The graph-building sum (``out + where(…)`` on a converted copy of each
    part) peaked at 10 parts' worth of memory for float16 parts (4.75 for float32) under
    ``torch.no_grad()``; here the accumulator and the result, 3 (1 for float32).  The same
    elementwise operations on the same values: the same bits."""
    import torch

    rows = out.view(-1, out.shape[-1]) if out.numel() else None
    block = max(1, _MERGE_BLOCK_BYTES // max(1, out.shape[-1] * out.element_size()))
    whole = rows is not None and rows.shape[0] <= block  # one block: the part whole (as merge_numpy)
    product = None if rows is None else torch.empty((min(block, rows.shape[0]), out.shape[-1]), dtype=out.dtype)
    for part, wi, empty in zip(outs, scale, empties):
        wi, empty = _as_out_axes(wi, layout), _as_out_axes(empty, layout)
        if rows is None:
            continue
        if whole and bool((wi != 0).all()):
            p = product.view(out.shape)
            torch.mul(wi, part, out=p)
            out.add_(p)
            continue
        if bool((wi != 0).all()):
            w_rows = wi.expand(tuple(out.shape[:-1]) + (1,)).reshape(-1, 1)  # (small: one per row)
            x_rows = part.reshape(-1, part.shape[-1])  # (a copy only for a part that no view can flatten)
            for r0 in range(0, rows.shape[0], block):
                r1 = min(r0 + block, rows.shape[0])
                p = product[: r1 - r0]
                torch.mul(w_rows[r0:r1], x_rows[r0:r1], out=p)
                rows[r0:r1].add_(p)
            continue
        x = part.to(out.dtype)
        out.add_(torch.where(wi != 0, wi * x, torch.where(empty | torch.isfinite(x), zero, x)))
    return out.to(_out_dtype([x.dtype for x in outs], torch.float64, torch.float32))


def _out_dtype(dtypes: list, float64: Any, float32: Any) -> Any:
    """The merged output's dtype: the parts' one; where they differ, the widest of them —
    float64 if a part is, else float32 (float16 beside bfloat16 too, as NumPy and torch promote).
    It was ``outs[0]``'s: the same parts in another order came back rounded otherwise."""
    first = dtypes[0]
    if all(d == first for d in dtypes):
        return first
    return float64 if any(d == float64 for d in dtypes) else float32


def _as_out_axes(w: Any, layout: str):
    """A part's weights ``(..., Hq, Lq)`` shaped to broadcast over its output."""
    if layout == "blhd":
        w = w.swapaxes(-1, -2) if isinstance(w, np.ndarray) else w.transpose(-1, -2)
    return w[..., None]
