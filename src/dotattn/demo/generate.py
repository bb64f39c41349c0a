"""``dotattn demo generate`` (and the end of ``dotattn demo``): SmolLM2-135M-Instruct answers
one question on dotattn, with its prefill and decode speed.

The prompt goes through one causal :func:`dotattn.attention` call per layer, then every new
token through the KV-cache decode path; the answer streams to the console.
"""

from __future__ import annotations

import time

from ._ui import console

QUESTION = "In one sentence: why does a language model keep a cache of keys and values?"


def run_generate(args) -> dict:
    """Load the model, answer :data:`QUESTION` greedily; everything printed, also returned."""
    from ..models import SmolLM

    start = time.perf_counter()
    model = SmolLM()
    load_s = time.perf_counter() - start
    max_new = 24 if args.quick else 96
    console.print(f"[bold]SmolLM2-135M-Instruct on dotattn[/bold] (loaded in {load_s:.1f} s) — [bold]question:[/bold] {QUESTION}")
    pieces = []
    for piece in model.generate(QUESTION, max_new_tokens=max_new, stream=True):
        pieces.append(piece)
        console.out(piece, end="", highlight=False)
    console.out("")
    stats = model.last_stats
    console.print(
        f"prefill {stats.prompt_tokens} tokens at {stats.prefill_tokens_per_s:.0f} tokens/s, "
        f"decode {stats.new_tokens} tokens at {stats.decode_tokens_per_s:.1f} tokens/s "
        f"(float32 weights; every attention call is dotattn)"
    )
    return {"answer": "".join(pieces), "stats": stats, "load_s": load_s}


def run(args) -> int:
    try:
        run_generate(args)
    except FileNotFoundError as exc:  # the model package is missing: say how to install it
        console.print(f"[red]dotattn demo: {exc}[/red]")
        return 1
    return 0
