"""Attention maps of a 16,384-token synthetic sequence — with :func:`dotattn.attention_map`.

The full probability matrix of one head would be 16,384² float32 = 1 GiB; the pooled maps
here are 128 × 128 and the peak memory stays a few MiB above the inputs.  Four heads show
four patterns a real model mixes:

* ``causal + ALiBi``: attention decays with distance, most mass near the diagonal;
* ``sliding window ±512``: a band, and nothing outside it (block skipping in the kernel);
* ``packed documents``: ``segment_ids`` give a block-diagonal map;
* ``repeated text (induction)``: the second half repeats the first, so each query of the
  second half finds its copy 8,192 positions back — an off-diagonal stripe.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..maps import attention_map


def _heads(n: int, d: int, seed: int):
    """(title, q, k, options) of each synthetic head; q and k are (n, d) float32."""
    rng = np.random.default_rng(seed)
    tokens = rng.standard_normal((n, d)).astype(np.float32)
    smooth = tokens * np.float32(0.3)
    repeated = tokens.copy()
    repeated[n // 2 :] = tokens[: n - n // 2]
    # gain 2.5: a key equal to the query scores ≈ 2.5²·√d above the rest after the 1/√d scale
    sharp = repeated * np.float32(2.5)
    rng_docs = np.random.default_rng(seed + 1)
    cuts = np.sort(rng_docs.choice(np.arange(1, n), size=7, replace=False))
    segments = np.searchsorted(cuts, np.arange(n), side="right")
    return [
        ("causal + ALiBi (slope 1/256)", smooth, smooth, dict(causal=True, alibi_slopes=np.array([1 / 256]))),
        ("sliding window ±512", smooth, smooth, dict(window=(512, 512))),
        ("packed documents (segment_ids)", smooth, smooth, dict(segment_ids=segments[None])),
        ("repeated text, causal (induction stripe)", sharp, sharp, dict(causal=True)),
    ]


def long_sequence_maps(
    n: int = 16384, d: int = 64, pool: int = 128, seed: int = 0, on_head: Callable[[str], None] | None = None
) -> dict[str, np.ndarray]:
    """``{title: (ceil(n/pool), ceil(n/pool)) block-averaged probabilities}`` of each head."""
    maps = {}
    for title, q, k, options in _heads(n, d, seed):
        # a (1, n, d) head with options given per sequence (segment ids need a batch axis)
        maps[title] = attention_map(q[None, None], k[None, None], pool=(pool, pool), **options)[0, 0]
        if on_head is not None:
            on_head(title)
    return maps


def plot_maps(maps: dict[str, np.ndarray], n: int, pool: int, path) -> None:
    from matplotlib.colors import LogNorm

    from ._ui import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, len(maps), figsize=(4.6 * len(maps), 4.8), squeeze=False)
    for ax, (title, m) in zip(axes[0], maps.items()):
        positive = m[m > 0]
        floor = max(float(positive.min()) if positive.size else 1e-12, float(m.max()) * 1e-6)
        im = ax.imshow(np.maximum(m, floor * 0.5), cmap="magma", norm=LogNorm(vmin=floor, vmax=float(m.max())), extent=(0, n, n, 0))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(
        f"dotattn.attention_map: {n:,} tokens, mean probability per {pool}×{pool} block (log scale) — "
        f"the full matrix would be {n * n * 4 / 2**30:.1f} GiB per head",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
