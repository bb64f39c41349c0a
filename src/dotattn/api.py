"""The public calls: ``attention()`` and ``attention_backward()``.

Thin by design (as flash-attention's interface module): document, route tensors of other
libraries to their front end, normalize through :mod:`dotattn.semantics`, and run the call
through :mod:`dotattn.dispatch` (the registry's backend), which the front ends use too —
they import that module, never this one, so no import circle runs through the front ends.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from . import semantics
from .dispatch import OPTION_NAMES, backward_in_caller_layout, find_plan, plan_forward, run_backward, run_forward
from .errors import AttentionValueError
from .frameworks import common_framework, frontend
from .semantics import DEFAULT_MAX_WEIGHTS_BYTES, AttentionCall

__all__ = ["attention", "attention_backward", "backward_in_caller_layout", "run_backward", "run_forward"]
_OPTION_NAMES = OPTION_NAMES  # the name front ends used before dispatch.py



def attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    mask: Any = None,
    bias: Any = None,
    causal: bool | str = False,
    window: tuple[int | None, int | None] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    alibi_slopes: Any = None,
    q_lengths: Any = None,
    kv_lengths: Any = None,
    segment_ids: Any = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    return_lse: bool = False,
    return_weights: bool = False,
    layout: str = "bhld",
    implementation: str | None = None,
    max_weights_bytes: int = DEFAULT_MAX_WEIGHTS_BYTES,
    **extras: Any,
):
    """Exact scaled dot-product attention ``softmax(scale · q·kᵀ + …) · v``.

    Arrays of NumPy, PyTorch, JAX or TensorFlow in; the same library out.

    Shapes (``layout="bhld"``; ``"blhd"`` swaps the L and H axes of q, k, v and the output)::

        q    (..., Hq, Lq, D)        k  (..., Hkv, Lk, D)        v  (..., Hkv, Lk, Dv)
        out  (..., Hq, Lq, Dv)       lse (..., Hq, Lq)           weights (..., Hq, Lq, Lk)

    2-D ``(L, D)`` inputs are one head without batch; 3-D ``(H, L, D)`` have no batch.
    ``Hq`` must be a multiple of ``Hkv`` (GQA/MQA: query head ``h`` reads K/V head
    ``h // (Hq // Hkv)``, without copying K/V).

    Args:
        mask: bool, broadcastable to ``(..., Hq, Lq, Lk)``; True = attend.
        bias: float, broadcastable to ``(..., Hq, Lq, Lk)``; added to the scores.
        causal: False, True (= ``"bottom_right"``), ``"bottom_right"`` or ``"top_left"``.
        window: ``(left, right)``: query at position p sees keys in ``[p − left, p + right]``;
            None on a side = unbounded.
        scale: score scale, default ``1/√D``; ``0.0`` is legal.
        softcap: ``s = softcap · tanh(s / softcap)``; None = off.
        alibi_slopes: ``(Hq,)`` or ``(..., Hq)``; ``s −= slope · |pos_q − pos_k|``.
        q_lengths, kv_lengths: int ``(...)`` real lengths; padding needs no mask.
        segment_ids: int ``(..., L)`` or a pair ``(q_ids (..., Lq), kv_ids (..., Lk))``.
        dropout_p, seed: dropout on the probabilities; the same seed gives the same mask
            on every backend.  Without a seed a fresh one is drawn.
        return_lse: also return the natural-log LSE, float32 (float64 for float64 inputs).
        return_weights: also return the pre-dropout probabilities (materialized; refused
            past ``max_weights_bytes``).
        implementation: None = the best able backend; or a name from ``dotattn.info()``.
        **extras: backend-specific options, e.g. the ``cpu`` backend's ``score_mod(score, b,
            h, q_idx, kv_idx)``, ``mask_mod(b, h, q_idx, kv_idx)`` and ``block_mask``.  A
            module-level ``def`` using only ``math``/NumPy and int/float constants is compiled
            once and cached on disk (``$DOTATTN_CACHE_DIR``, default ``~/.cache/dotattn``);
            lambdas, closures and captured arrays compile once per process (``docs/performance.md``).

    Returns:
        ``out``; ``(out, lse)``; ``(out, weights)``; or ``(out, lse, weights)``.

    Rows with no visible key give 0 and ``lse = −inf`` (never NaN).  The full contract is in
    ``docs/semantics.md``.
    """
    return_lse = semantics.check_flag("return_lse", return_lse)
    return_weights = semantics.check_flag("return_weights", return_weights)
    numpy_in = (
        type(q) is np.ndarray
        and type(k) is np.ndarray
        and type(v) is np.ndarray
        and (mask is None or type(mask) is np.ndarray)
        and (bias is None or type(bias) is np.ndarray)
    )
    key = None
    if numpy_in and (
        mask is None
        and bias is None
        and alibi_slopes is None
        and segment_ids is None
        and seed is None
        and not extras
        and not return_weights
    ):
        # NumPy in (the common case), of a kind seen before: reuse its plan — normalize()'s
        # decisions, the backend and its set-up.  Only the lengths' values are checked again
        # (semantics.rebind).
        key = semantics.plan_key(
            q, k, v, causal=causal, window=window, scale=scale, softcap=softcap, dropout_p=dropout_p,
            layout=layout, has_q_lengths=q_lengths is not None, has_kv_lengths=kv_lengths is not None,
            implementation=implementation,
        )
        if key is not None:
            plan = find_plan(key)
            if plan is not None:
                call = semantics.rebind(plan.template, q, k, v, q_lengths, kv_lengths)
                return _planned_results(call, plan.run(call), return_lse)
    if not numpy_in:
        torch = sys.modules.get("torch")
        if (
            torch is not None
            and type(q) is torch.Tensor
            and type(k) is torch.Tensor
            and type(v) is torch.Tensor
            and mask is None
            and bias is None
        ):
            # Plain tensors and no other array to check for a mix of libraries: the torch front
            # end, without the framework detection.
            fw = "torch"
        else:
            fw = common_framework(q=q, k=k, v=v, mask=mask, bias=bias)
        if fw != "numpy":
            # Keywords spelled out, not an options dict: a dict and its unpacking cost the torch
            # front end's small calls ≈ 0.7 µs (3 %).
            return frontend(fw).attention(
                q,
                k,
                v,
                mask=mask,
                bias=bias,
                causal=causal,
                window=window,
                scale=scale,
                softcap=softcap,
                alibi_slopes=alibi_slopes,
                q_lengths=q_lengths,
                kv_lengths=kv_lengths,
                segment_ids=segment_ids,
                dropout_p=dropout_p,
                seed=seed,
                return_lse=return_lse,
                return_weights=return_weights,
                layout=layout,
                implementation=implementation,
                max_weights_bytes=max_weights_bytes,
                **extras,
            )
    call = semantics.normalize(
        q,
        k,
        v,
        mask=mask,
        bias=bias,
        causal=causal,
        window=window,
        scale=scale,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        q_lengths=q_lengths,
        kv_lengths=kv_lengths,
        segment_ids=segment_ids,
        dropout_p=dropout_p,
        seed=seed,
        layout=layout,
        extras=extras,
    )
    if key is not None and call.dropout_p == 0.0:
        plan = plan_forward(key, call, implementation)
        if plan is not None:
            return _planned_results(call, plan.run(call), return_lse)
    return _forward_results(call, implementation, return_lse, return_weights, max_weights_bytes)


def _planned_results(call: AttentionCall, results, return_lse):
    """A planned forward's ``(out, lse)`` in the caller's layout (no weights: plans have none)."""
    out = semantics.finalize_output(call, results[0])
    return (out, semantics.finalize_lse(call, results[1])) if return_lse else out


def _forward_results(call: AttentionCall, implementation, return_lse, return_weights, max_weights_bytes):
    """Run the forward of a normalized NumPy call; results in the caller's layout."""
    out, lse, weights = run_forward(
        call,
        implementation=implementation,
        return_weights=return_weights,
        max_weights_bytes=max_weights_bytes,
        final=True,
    )
    out = semantics.finalize_output(call, out)
    if not (return_lse or return_weights):
        return out
    results = [out]
    if return_lse:
        results.append(semantics.finalize_lse(call, lse))
    if return_weights:
        results.append(semantics.finalize_pairwise(call, weights))
    return tuple(results)


def attention_backward(
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    dout: Any,
    *,
    implementation: str | None = None,
    return_dbias: bool = False,
    **options: Any,
):
    """Gradients of ``attention()`` from its saved output and LSE: ``(dq, dk, dv)``.

    Computed blockwise (FlashAttention-2): scores are recomputed from ``lse``, no
    ``Lq × Lk`` matrix is kept.  ``options`` are the forward's keyword arguments (mask, causal,
    …, ``seed`` is required when ``dropout_p > 0``).  ``out``/``dout`` are shaped like the
    output, ``lse`` like the returned LSE.  With ``return_dbias=True`` (and a ``bias``) the
    gradient of the bias, reduced to the bias's own shape, comes fourth.

    NumPy arrays only: PyTorch users get gradients through autograd instead.
    """
    return_dbias = semantics.check_flag("return_dbias", return_dbias)
    unknown = set(options) - set(OPTION_NAMES)
    call = semantics.normalize(
        q, k, v, for_backward=True, extras={n: options.pop(n) for n in unknown}, **options
    )
    if return_dbias and call.bias is None:
        raise AttentionValueError("return_dbias=True needs a bias= argument to differentiate")
    return backward_in_caller_layout(call, out, lse, dout, implementation=implementation, return_dbias=return_dbias)
