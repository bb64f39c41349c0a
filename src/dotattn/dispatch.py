"""Running a normalized call on the registry's backend: the path every front end shares.

:func:`dotattn.attention` routes tensors of other libraries to their front end
(``dotattn.torch``, ``dotattn.jax``, ``dotattn.tensorflow``); those come back here, not to
:mod:`dotattn.api`, so the front ends sit below the API and no import circle runs through them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import registry, semantics
from .semantics import DEFAULT_MAX_WEIGHTS_BYTES, AttentionCall

# The keyword options of attention() that are not backend extras.
OPTION_NAMES = (
    "mask",
    "bias",
    "causal",
    "window",
    "scale",
    "softcap",
    "alibi_slopes",
    "q_lengths",
    "kv_lengths",
    "segment_ids",
    "dropout_p",
    "seed",
    "layout",
)


def run_forward(
    call: AttentionCall,
    *,
    implementation: str | None = None,
    return_weights: bool = False,
    max_weights_bytes: int = DEFAULT_MAX_WEIGHTS_BYTES,
    final: bool = False,
):
    """Canonical forward for front ends: ``(out, lse, weights | None)`` in canonical shapes.

    ``final``: ``out`` goes to the caller as it is (no merge of partial results follows): a
    backend with ``forward_final`` may then return it in the call's dtype already (the cpu
    backend writes bfloat16 rows in its kernel instead of a float32 array cast afterwards).
    Merges of partial outputs (ring, Ulysses) leave it False and get the compute dtype.
    """
    if return_weights:
        semantics.check_weights_size(call, max_weights_bytes)
    backend = registry.select(call, implementation)
    if call.B * call.Hq * call.Lq == 0:  # no query row: empty results, whatever the backend
        dt = call.compute_dtype
        out = np.zeros((call.B, call.Hq, call.Lq, call.Dv), dtype=dt)
        lse = np.zeros((call.B, call.Hq, call.Lq), dtype=dt)
        weights = np.zeros((call.B, call.Hq, call.Lq, call.Lk), dtype=dt) if return_weights else None
        return out, lse, weights
    run = getattr(backend, "forward_final", None) if final else None
    out, lse = (run or backend.forward)(call)
    weights = None
    if return_weights:
        # Weights come back in the accumulation dtype (as the LSE) whichever backend made them.
        weights = backend.weights(call, lse).astype(call.compute_dtype, copy=False)
    return out, lse, weights


class ForwardPlan:
    """What repeated forwards of one kind reuse (:func:`plan_forward`): the normalized call
    without its arrays (``semantics.call_template``) and the chosen backend's runner — the
    dispatch decision, and whatever set-up the backend's ``forward_plan`` did once."""

    __slots__ = ("template", "run")

    def __init__(self, template, run):
        self.template = template
        self.run = run


# Plans by ``semantics.plan_key``; cleared whole when full (a program makes few kinds of call).
_PLANS: dict[tuple, ForwardPlan] = {}
_MAX_PLANS = 256


def find_plan(key: tuple) -> ForwardPlan | None:
    """The plan made for calls of this ``semantics.plan_key``, if any."""
    return _PLANS.get(key)


def plan_forward(key: tuple, call: AttentionCall, implementation: str | None) -> ForwardPlan | None:
    """A plan for calls of ``key``'s kind, made from ``call`` (``normalize()``'s result for one
    of them) and kept; None for calls that get none (no query row: ``run_forward``'s case).

    The backend is selected here as :func:`run_forward` selects it; a refused call raises
    before anything is kept.  ``run(call)`` is the backend's ``forward`` or what its
    ``forward_plan(call)`` returns.
    """
    if call.B * call.Hq * call.Lq == 0:
        return None
    backend = registry.select(call, implementation)
    make = getattr(backend, "forward_plan", None)
    plan = ForwardPlan(semantics.call_template(call), backend.forward if make is None else make(call))
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


def clear_plans() -> None:
    """Forget every plan (tests that swap backends in the registry call this)."""
    _PLANS.clear()


def run_backward(
    call: AttentionCall,
    out: np.ndarray,
    lse: np.ndarray,
    dout: np.ndarray,
    *,
    implementation: str | None = None,
    want_dbias: bool = False,
    final: bool = False,
    dlse: np.ndarray | None = None,
):
    """Canonical backward for front ends: ``(dq, dk, dv, dbias | None)`` in canonical shapes.

    ``dbias`` comes back with the full ``(B, Hq, Lq, Lk)`` shape; reduce it with
    :func:`dotattn.semantics.reduce_bias_grad`.  ``final``: dq, dk and dv go to the caller as
    they are (no sum of partial gradients follows, as ring attention's does): a backend with
    ``backward_final`` may then return them in the call's dtype already (the cpu backend
    rounds bfloat16 gradients in a compiled pass instead of ``finalize_grad``'s ``astype``).
    ``dlse`` (canonical ``(B, Hq, Lq)``): a gradient through the LSE as well — a backend with
    ``takes_dlse`` takes it as it is, any other the call folded by
    :func:`dotattn.semantics.fold_lse_grad`.
    """
    backend = registry.select(call, implementation, need_backward=True)
    if call.B * call.Hq * call.Lq == 0:  # no query row: nothing flows back to k or v
        dt = call.compute_dtype
        return (
            np.zeros(call.q.shape, dtype=dt),
            np.zeros(call.k.shape, dtype=dt),
            np.zeros(call.v.shape, dtype=dt),
            np.zeros((call.B, call.Hq, call.Lq, call.Lk), dtype=dt) if want_dbias else None,
        )
    run = getattr(backend, "backward_final", None) if final else None
    run = run or backend.backward
    if dlse is None:
        return run(call, out, lse, dout, want_dbias)
    if getattr(backend, "takes_dlse", False):  # (the cpu backend: Δ − dlse where it forms Δ itself)
        return run(call, out, lse, dout, want_dbias, dlse=dlse)
    return semantics.backward_with_folded_lse_grad(
        lambda c, o, l, d: run(c, o, l, d, want_dbias), call, out, lse, dout, dlse
    )


def backward_in_caller_layout(
    call: AttentionCall, out: Any, lse: Any, dout: Any, *, implementation: str | None = None, return_dbias: bool = False
):
    """``(dq, dk, dv[, dbias])`` shaped as the caller's q, k, v (and bias) from caller-shaped
    ``out``, ``lse``, ``dout`` — the backward every non-autograd front end needs."""
    out_c = semantics.canonical_like(call, "out", out, call.Dv)
    dout_c = semantics.canonical_like(call, "dout", dout, call.Dv)
    lse_c = semantics.canonical_lse(call, lse)
    dq, dk, dv, dbias = run_backward(
        call, out_c, lse_c, dout_c, implementation=implementation, want_dbias=return_dbias, final=True
    )
    grads = (
        semantics.finalize_grad(call, dq, "q"),
        semantics.finalize_grad(call, dk, "k"),
        semantics.finalize_grad(call, dv, "v"),
    )
    if return_dbias:
        return grads + (semantics.reduce_bias_grad(call, dbias).astype(call.bias.dtype, copy=False),)
    return grads
