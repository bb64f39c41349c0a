"""``dotattn demo scaling``: why attention divides the scores by √d_k (seed 003).

For random queries and keys with unit-variance entries, ``q·k`` has variance ``d_k``.  Without
the factor, growing ``d_k`` pushes the softmax into saturation: one key takes almost all the
probability, the entropy collapses, and the gradient that flows back into the scores —
``dS = P ∘ (dP − rowsum(dP ∘ P))`` — vanishes with it.  With ``scale = 1/√d_k`` (dotattn's
default) the variance stays 1 and nothing collapses.

Every number comes from dotattn: probabilities from ``attention(..., return_weights=True)``
and the gradient reaching the scores from ``attention_backward(..., return_dbias=True)`` on a
zero bias (the bias is added to the scores, so its gradient *is* the scores' gradient).
"""

from __future__ import annotations

import numpy as np

from ..api import attention, attention_backward
from ._ui import console, out_dir, progress

D_KS = (16, 64, 256, 1024)


def measure(d_k: int, scaled: bool, *, n: int = 128, heads: int = 8, seed: int = 0) -> dict[str, float]:
    """Score variance, softmax entropy (nats), mean max probability, share of saturated queries
    (max probability > 0.99) and the median per-query norm of the gradient of the loss
    ``Σ out ∘ g`` (g random) with respect to the scores, for one setting (float64)."""
    rng = np.random.default_rng([seed, d_k])
    q = rng.standard_normal((heads, n, d_k))
    k = rng.standard_normal((heads, n, d_k))
    v = rng.standard_normal((heads, n, 64))
    g = rng.standard_normal((heads, n, 64))  # upstream gradient dL/d(out)
    scale = None if scaled else 1.0  # None = dotattn's default 1/√d_k
    zero_bias = np.zeros((heads, n, n))
    out, lse, p = attention(q, k, v, bias=zero_bias, scale=scale, return_lse=True, return_weights=True)
    _, _, _, d_scores = attention_backward(q, k, v, out, lse, g, bias=zero_bias, scale=scale, return_dbias=True)
    s = (1 / np.sqrt(d_k) if scaled else 1.0) * np.einsum("hqd,hkd->hqk", q, k)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=-1)
    # Per query: the norm of its row of dL/dscores.  The median shows what a typical query
    # gets; a mean would be carried by the few unsaturated rows.
    row_grad = np.linalg.norm(d_scores, axis=-1)
    return {
        "variance": float(s.var()),
        "entropy": float(entropy.mean()),
        "max_prob": float(p.max(axis=-1).mean()),
        "saturated": float((p.max(axis=-1) > 0.99).mean()),
        "grad_median": float(np.median(row_grad)),
    }


def sweep(*, n: int, heads: int, seed: int, on_step=None) -> dict[bool, dict[int, dict[str, float]]]:
    """``{scaled: {d_k: measure(...)}}`` for both variants and every d_k."""
    results: dict[bool, dict[int, dict[str, float]]] = {True: {}, False: {}}
    for scaled in (True, False):
        for d_k in D_KS:
            results[scaled][d_k] = measure(d_k, scaled, n=n, heads=heads, seed=seed)
            if on_step is not None:
                on_step(d_k, scaled)
    return results


def conclusion(results, n: int) -> list[str]:
    """The two-line conclusion, with the measured numbers."""
    big, small = D_KS[-1], D_KS[0]
    u, s = results[False], results[True]
    return [
        f"Without 1/√d_k the score variance grows with d_k ({u[small]['variance']:.0f} → {u[big]['variance']:.0f}): "
        f"at d_k={big} the softmax saturates (max prob {u[big]['max_prob']:.2f}, entropy {u[big]['entropy']:.2f} of "
        f"{np.log(n):.2f} nats, {u[big]['saturated']:.0%} of queries above 0.99) and the median gradient reaching "
        f"the scores falls {u[small]['grad_median'] / u[big]['grad_median']:.0f}× from d_k={small}.",
        f"With 1/√d_k the variance stays ≈ 1 ({s[small]['variance']:.2f} … {s[big]['variance']:.2f}), the entropy "
        f"≈ {s[big]['entropy']:.2f} nats and the median gradient ≈ constant ({s[small]['grad_median']:.2g} … {s[big]['grad_median']:.2g}): "
        "the factor keeps attention trainable at any head size.",
    ]


def plot(results, n: int, path) -> None:
    from ._ui import pyplot

    plt = pyplot()
    panels = [
        ("variance", "score variance", True),
        ("entropy", f"softmax entropy (nats, max {np.log(n):.2f})", False),
        ("max_prob", "mean max probability (saturation)", False),
        ("grad_median", "median per-query |dL/dscores|", True),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, (key, label, log_y) in zip(axes, panels):
        for scaled, style in ((True, "o-"), (False, "s--")):
            ys = [results[scaled][d][key] for d in D_KS]
            ax.plot(D_KS, ys, style, label="scaled by 1/√d_k" if scaled else "unscaled")
        ax.set_xscale("log", base=2)
        if log_y:
            ax.set_yscale("log")
        ax.set_xticks(D_KS, [str(d) for d in D_KS])
        ax.set_xlabel("d_k")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"Scaled dot-product attention: random q, k ~ N(0, 1), {n} keys", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_scaling(args) -> dict:
    n, heads = (64, 2) if args.quick else (256, 8)
    with progress() as bar:
        task = bar.add_task("scaling sweep", total=2 * len(D_KS), note="")
        results = sweep(
            n=n, heads=heads, seed=args.seed,
            on_step=lambda d, sc: bar.update(task, advance=1, note=f"d_k={d} {'scaled' if sc else 'unscaled'}"),
        )
    path = out_dir(args) / "scaling.png"
    plot(results, n, path)
    return {"results": results, "n": n, "png": path, "conclusion": conclusion(results, n)}


def run(args) -> int:
    from rich.table import Table

    r = run_scaling(args)
    table = Table(title="1/√d_k: with (scaled) and without (unscaled)", title_justify="left")
    for col in ("d_k", "variant", "score variance", "entropy (nats)", "max prob", "saturated", "median |dL/ds|"):
        table.add_column(col, justify="right")
    for scaled in (True, False):
        for d_k in D_KS:
            m = r["results"][scaled][d_k]
            table.add_row(
                str(d_k), "scaled" if scaled else "unscaled", f"{m['variance']:.2f}", f"{m['entropy']:.3f}",
                f"{m['max_prob']:.3f}", f"{m['saturated']:.0%}", f"{m['grad_median']:.3g}",
            )
    console.print(table)
    for line in r["conclusion"]:
        console.print(line)
    console.print(f"wrote {r['png']}")
    return 0
