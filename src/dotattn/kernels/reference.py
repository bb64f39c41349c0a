"""The float64 reference: materializes the scores, written to be read.

This is the oracle every other backend is tested against.  It follows the score order of
``docs/semantics.md`` literally, one (sequence, head) at a time, with a stable softmax
(subtract the row max) so logits of ±1e4 stay finite.  Memory is O(Lq·Lk) per head.
"""

from __future__ import annotations

import numpy as np

from ..semantics import AttentionCall
from ._ieee import quiet
from .dropout import keep_block_of

NAME = "reference"


def _head_inputs(call: AttentionCall, b: int, h: int):
    """Float64 q/k/v of one head with rows past the real lengths zeroed.

    Padding may hold anything (tests fill it with NaN); zeroing it keeps ``0 · NaN`` out of
    the products, which is what "padding never leaks" means.
    """
    hk = h // call.group
    q = call.q[b, h].astype(np.float64)
    k = call.k[b, hk].astype(np.float64)
    v = call.v[b, hk].astype(np.float64)
    q[call.q_len(b):] = 0.0
    k[call.kv_len(b):] = 0.0
    v[call.kv_len(b):] = 0.0
    return q, k, v


def _scores(call: AttentionCall, b: int, h: int, q: np.ndarray, k: np.ndarray):
    """Masked scores (−inf where invisible) and tanh(s/c) for the softcap's derivative.

    Visible scores follow IEEE arithmetic (NaN and ±inf included); a −inf bias entry hides
    its key exactly as the masks do, even where the score is NaN or +inf.
    """
    rows, cols = np.arange(call.Lq), np.arange(call.Lk)
    s = call.scale * (q @ k.T)  # (Lq, Lk)
    tanh = None
    if call.softcap is not None:
        tanh = np.tanh(s / call.softcap)
        s = call.softcap * tanh
    if call.bias is not None:
        s = s + call.bias[b, h].astype(np.float64)
    if call.alibi_slopes is not None:
        pos_q = rows[:, None] + call.q_offset(b)
        s = s - float(call.alibi_slopes[b, h]) * np.abs(pos_q - cols[None, :])
    visible = call.visible(b, h, rows, cols)
    if call.bias is not None:
        visible = visible & (call.bias[b, h] != -np.inf)
    s = np.where(visible, s, -np.inf)
    return s, visible, tanh


def _softmax(s: np.ndarray):
    """Row softmax and log-sum-exp over the keys with a score above −inf.

    Rows with no such key give p = 0 and lse = −inf.  Otherwise IEEE arithmetic: a NaN or
    +inf score makes ``exp(s − max)`` NaN, so that row's p and lse are NaN (hidden keys keep
    p = 0).
    """
    live = s != -np.inf
    m = s.max(axis=-1, initial=-np.inf)  # NaN if a score is NaN
    seen = m != -np.inf
    m_safe = np.where(seen, m, 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.where(live, np.exp(s - m_safe[:, None]), 0.0)
        total = e.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(seen[:, None] & live, e / total[:, None], 0.0)
        lse = np.where(seen, m_safe + np.log(total), -np.inf)
    return p, lse


def _live_matmul(a: np.ndarray, live: np.ndarray, b: np.ndarray, positive=None) -> np.ndarray:
    """``Σ_j a[i, j] · b[j, :]`` over the pairs ``live`` marks only — literally, so a hidden
    pair's 0 never meets a NaN/±inf of ``b`` (one BLAS product when ``b`` is finite).

    ``positive`` marks pairs whose exact coefficient is > 0 (the softmax weight of a visible,
    kept key): where it has underflowed to 0, a ±inf of ``b`` still gives ±inf, not 0·inf.
    """
    if np.isfinite(b).all():
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf in ``a`` are meant to propagate
            return a @ b
    signed = a if positive is None else np.where(positive & (a == 0), np.nextafter(0.0, 1.0), a)
    out = np.empty((a.shape[0], b.shape[1]))
    with np.errstate(invalid="ignore", over="ignore"):
        for d in range(b.shape[1]):
            col = b[None, :, d]
            # finite entries keep their exact (possibly 0) product; ±inf meets the coefficient's sign
            out[:, d] = np.where(live, np.where(np.isfinite(col), a * col, signed * col), 0.0).sum(axis=1)
    return out


def _dropout_scale(call: AttentionCall, b: int, h: int) -> np.ndarray | None:
    """keep/(1−p) for this head, or None without dropout."""
    if call.dropout_p == 0.0:
        return None
    keep = keep_block_of(call, b, h, np.arange(call.Lq), np.arange(call.Lk))
    return keep / (1.0 - call.dropout_p)


@quiet
def probabilities(call: AttentionCall) -> np.ndarray:
    """Softmax weights (B, Hq, Lq, Lk), float64, before dropout."""
    p_all = np.zeros((call.B, call.Hq, call.Lq, call.Lk))
    for b in range(call.B):
        for h in range(call.Hq):
            q, k, _ = _head_inputs(call, b, h)
            p_all[b, h], _ = _softmax(_scores(call, b, h, q, k)[0])
    return p_all


@quiet
def forward(call: AttentionCall) -> tuple[np.ndarray, np.ndarray]:
    """(out (B, Hq, Lq, Dv), lse (B, Hq, Lq)), both float64."""
    out = np.zeros((call.B, call.Hq, call.Lq, call.Dv))
    lse = np.full((call.B, call.Hq, call.Lq), -np.inf)
    for b in range(call.B):
        for h in range(call.Hq):
            q, k, v = _head_inputs(call, b, h)
            s, _, _ = _scores(call, b, h, q, k)
            p, lse[b, h] = _softmax(s)
            drop = _dropout_scale(call, b, h)
            live = s != -np.inf
            if drop is not None:
                p = p * drop
            out[b, h] = _live_matmul(p, live, v, live if drop is None else live & (drop > 0))
    return out, lse


@quiet
def backward(call: AttentionCall, out: np.ndarray, lse: np.ndarray, dout: np.ndarray, want_dbias: bool = False):
    """Gradients (dq, dk, dv, dbias|None) by the dense formulas (float64).

    ``dS = P ∘ (dP − rowsum(dO ∘ O))``; the softcap multiplies by ``1 − tanh²``.  Every
    product runs over the pairs that take part only (hidden pairs contribute nothing, even
    where q, k, v or dO hold NaN).  For a whole call the reference recomputes P on its own,
    so it checks the tiled backends' use of the LSE rather than sharing it; only a non-finite
    ``lse`` entry is taken from the caller (NaN: the row's P is NaN; ±inf: the row adds nothing).  A block call (internal ``call.block``) is normalized by the full problem's
    softmax, which only the saved ``lse`` carries: there ``P = exp(S − lse)``.
    """
    dq = np.zeros((call.B, call.Hq, call.Lq, call.D))
    dk = np.zeros((call.B, call.Hkv, call.Lk, call.D))
    dv = np.zeros((call.B, call.Hkv, call.Lk, call.Dv))
    dbias = np.zeros((call.B, call.Hq, call.Lq, call.Lk)) if want_dbias else None
    for b in range(call.B):
        n_q = call.q_len(b)
        for h in range(call.Hq):
            hk = h // call.group
            q, k, v = _head_inputs(call, b, h)
            do = np.asarray(dout[b, h], dtype=np.float64).copy()
            o = np.asarray(out[b, h], dtype=np.float64).copy()
            do[n_q:] = 0.0
            o[n_q:] = 0.0
            s, _, tanh = _scores(call, b, h, q, k)
            live = s != -np.inf
            if call.block is None:
                p, _ = _softmax(s)
                # The saved LSE only decides non-finite rows: NaN makes the row's P NaN where it
                # sees keys; ±inf (−inf: the row saw nothing) makes it contribute nothing.
                given = np.asarray(lse[b, h], dtype=np.float64)
                p = np.where(np.isinf(given)[:, None], 0.0, p)
                p = np.where(np.isnan(given)[:, None] & live, np.nan, p)
            else:
                row_lse = np.asarray(lse[b, h], dtype=np.float64)
                row_lse = np.where(np.isneginf(row_lse), np.inf, row_lse)  # rows that see nothing: P = 0
                with np.errstate(invalid="ignore"):
                    p = np.where(live, np.exp(s - row_lse[:, None]), 0.0)  # a NaN lse stays in its row
                p[n_q:] = 0.0
            drop = _dropout_scale(call, b, h)
            p_dropped = p if drop is None else p * drop
            kept = live if drop is None else live & (drop > 0)
            dv[b, hk] += _live_matmul(p_dropped.T, live.T, do, kept.T)
            dp = do @ v.T
            if drop is not None:
                dp = dp * drop
            delta = (do * o).sum(axis=-1)  # D_i = rowsum(dO ∘ O)
            with np.errstate(invalid="ignore"):
                ds = np.where(live, p * (dp - delta[:, None]), 0.0)
                if dbias is not None:
                    dbias[b, h] = ds
                if tanh is not None:
                    ds = np.where(live, ds * (1.0 - tanh**2), 0.0)
            dq[b, h] = call.scale * _live_matmul(ds, live, k)
            dk[b, hk] += call.scale * _live_matmul(ds.T, live.T, q)
    return dq, dk, dv, dbias


class ReferenceBackend:
    """Float64, materialized, supports everything; the slowest and the most obviously right."""

    name = NAME
    description = "float64 materialized scores — the test oracle (O(Lq·Lk) memory)"

    def available(self) -> tuple[bool, str]:
        return True, "always available"

    def unsupported_reasons(self, call: AttentionCall) -> list[str]:
        reasons = []
        if call.extras:
            reasons.append(f"does not take {', '.join(sorted(call.extras))}")
        return reasons

    def forward(self, call: AttentionCall):
        return forward(call)

    def backward(self, call, out, lse, dout, want_dbias=False):
        return backward(call, out, lse, dout, want_dbias)

    def weights(self, call: AttentionCall, lse: np.ndarray) -> np.ndarray:
        del lse
        return probabilities(call)
