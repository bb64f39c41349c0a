"""Why the float32 backward can miss the 2×-naive rule: P rebuilt from the LSE with scores
summed in a different order from the forward's.

The backward rebuilds ``P = exp(S − lse)`` from the forward's LSE.  When its ``S`` has exactly
the forward's bits, each row of P still sums to one and the scores' rounding cancels, as it
does in the naive ``softmax`` (which divides by the sum of its own exponentials).  When the
two passes sum each score's D products in different orders (another GEMM blocking, another
tile shape), the rounding no longer cancels and P — and with it dV, dK, dQ — carries the
scores' full rounding error.

This script emulates only that step in NumPy (no dotattn kernel): ``dV = Pᵀ·dO`` with P from
the LSE of the float32 scores ``q·kᵀ`` (NumPy's BLAS), and the scores recomputed either the
same way or by ``einsum`` (another summation order), against the float64 reference and the
naive float32 softmax of ``tests/helpers.py``.  It then measures the cpu backend's own
gradients on the same inputs::

    PYTHONPATH=src .venv/bin/python benchmarks/f32_backward_score_consistency.py
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import helpers  # noqa: E402  (the tolerance rule's reference and naive baseline)

CASES = ((0, 300, 681, 8, 2.0), (0, 170, 486, 64, 0.5), (1, 256, 512, 64, 1.0))


def inputs(seed: int, Lq: int, Lk: int, D: int):
    rng = np.random.default_rng(seed)
    shape_q, shape_k = (1, 2, Lq, D), (1, 2, Lk, D)
    return tuple(rng.standard_normal(s).astype(np.float32) for s in (shape_q, shape_k, shape_k, shape_q))


def emulate(q, k, do, dv_ref, scale: float) -> dict[str, float]:
    """Max |dV − reference| of one head with P from the LSE, per way of recomputing S."""
    q0, k0, do0 = q[0, 0], k[0, 0], do[0, 0]
    S = (q0 @ k0.T).astype(np.float64) * scale  # the forward's scores (float32 products)
    lse = np.log(np.exp(S - S.max(1, keepdims=True)).sum(1)) + S.max(1)
    other = np.einsum("id,jd->ij", q0, k0).astype(np.float64) * scale  # another order
    out = {}
    for name, scores in (("S with the forward's bits, exact LSE", S), ("S in another summation order, exact LSE", other)):
        P = np.exp(scores - lse[:, None]).astype(np.float32)
        out[name] = float(np.abs(P.T @ do0 - dv_ref[0, 0]).max())
    # the forward's bits, the LSE as a float32 kernel keeps it: base 2, max and log2(row sum)
    x = (q0 @ k0.T * np.float32(scale * np.log2(np.e))).astype(np.float32)
    m = x.max(1)
    row_sum = np.exp2((x - m[:, None]).astype(np.float64)).astype(np.float32).sum(1, dtype=np.float32)
    log_sum = np.log2(row_sum).astype(np.float32)
    kept = {
        "the forward's bits, LSE rounded to float32": (m + log_sum).astype(np.float32).astype(np.float64),
        "the forward's bits, max and log2(sum) kept apart": None,
    }
    for name, lse2 in kept.items():
        if lse2 is None:  # 2^((x − m) − log2 l): the max cancels exactly, as in the naive softmax
            arg = (x - m[:, None]).astype(np.float64) - log_sum[:, None].astype(np.float64)
        else:
            arg = x.astype(np.float64) - lse2[:, None]
        P = np.exp2(arg).astype(np.float32)
        out[name] = float(np.abs(P.T @ do0 - dv_ref[0, 0]).max())
    return out


def main() -> int:
    import dotattn

    try:
        import torch
    except ImportError:
        torch = None
    for seed, Lq, Lk, D, scale in CASES:
        q, k, v, do = inputs(seed, Lq, Lk, D)
        ref = helpers.reference_grads(q, k, v, do, scale=scale)
        naive = helpers.naive_grads(q, k, v, do, scale=scale)
        naive_dv = float(np.abs(naive[2] - ref[2])[:, :1].max())
        print(f"Lq {Lq} Lk {Lk} D {D} scale {scale}: naive dV error (head 0) {naive_dv:.3g}")
        if torch is not None:
            _, lse = dotattn.attention(q, k, v, scale=scale, return_lse=True, implementation="cpu")
            S64 = q[0, 0].astype(np.float64) @ k[0, 0].T.astype(np.float64) * scale
            exact = np.log(np.exp(S64 - S64.max(1, keepdims=True)).sum(1)) + S64.max(1)
            half_ulp = float(np.spacing(np.abs(lse[0, 0]).max())) / 2
            print(f"  cpu backend LSE (head 0): max error {np.abs(lse[0, 0] - exact).max():.3g}, half an ulp of its largest {half_ulp:.3g}")
        for name, err in emulate(q, k, do, ref[2][:, :1], scale).items():
            print(f"  emulated, {name}: {err:.3g} ({err / naive_dv:.2f}× naive)")
        if torch is None:
            continue
        tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
        dotattn.attention(tq, tk, tv, scale=scale, implementation="cpu").backward(torch.from_numpy(do))
        for name, t, r, n in zip(("dQ", "dK", "dV"), (tq, tk, tv), ref, naive):
            ours, nerr = float(np.abs(t.grad.numpy() - r).max()), float(np.abs(n - r).max())
            print(f"  cpu backend {name}: {ours:.3g} ({ours / nerr:.2f}× naive)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
