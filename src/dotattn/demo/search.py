"""``dotattn demo``: semantic search with all-MiniLM-L6-v2 running on dotattn.

Encodes a built-in corpus, answers a few queries (top-3 by cosine similarity), prints the
timings, and draws two pictures: ``attention.png`` (every layer × head of one sentence,
weights from ``return_weights=True``) and ``attention_map_16k.png`` (block-averaged maps of
a 16,384-token synthetic sequence from :func:`dotattn.attention_map`).
"""

from __future__ import annotations

import time

import numpy as np

from ._ui import console, out_dir, progress, stopwatch

CORPUS = [
    # cooking
    "Knead the dough for ten minutes until it is smooth and elastic.",
    "Simmer the tomato sauce slowly so the flavours can blend.",
    "A pinch of salt brings out the sweetness in caramel.",
    "Let the steak rest for five minutes before slicing it.",
    "Fresh basil should be added at the very end of cooking.",
    # space
    "The James Webb telescope observes the universe in infrared light.",
    "Mars has the largest volcano in the solar system, Olympus Mons.",
    "A light-year is the distance light travels in one year.",
    "The Moon always shows the same face to the Earth.",
    "Saturn's rings are made mostly of ice particles.",
    # sport
    "The striker scored twice in the final ten minutes of the match.",
    "Marathon runners often hit a wall around the thirtieth kilometre.",
    "She won the tennis final in straight sets.",
    "The cyclist attacked on the last climb and won the stage alone.",
    "Swimmers shave their bodies to reduce drag in the water.",
    # computing
    "Attention lets each token look at every other token in the sequence.",
    "FlashAttention computes exact attention without storing the full score matrix.",
    "A hash table gives average constant-time lookups.",
    "Garbage collection frees memory that a program no longer uses.",
    "Compilers translate source code into machine instructions.",
    # health
    "Regular exercise lowers the risk of heart disease.",
    "Drinking enough water helps the body regulate its temperature.",
    "Sleep deprivation impairs memory and concentration.",
    "Vaccines train the immune system to recognise a pathogen.",
    "Too much sugar in the diet can lead to tooth decay.",
    # money and travel
    "The central bank raised interest rates to fight inflation.",
    "Diversifying investments reduces the risk of a large loss.",
    "The night train from Vienna arrives in Venice at dawn.",
    "Pack light: airlines charge extra for checked luggage.",
    "The museum is closed on Mondays and public holidays.",
    # animals
    "Octopuses can change the colour and texture of their skin.",
    "Honeybees communicate the location of flowers with a waggle dance.",
    "The cheetah is the fastest land animal.",
    "Emperor penguins huddle together to survive the Antarctic winter.",
    "My cat sleeps on the warm laptop keyboard all afternoon.",
]

QUERIES = [
    "How do I make pizza dough?",
    "Which planet has a giant volcano?",
    "memory-efficient transformer kernels",
    "Why should I go to bed earlier?",
    "cheap ways to travel in Europe by rail",
    "animals that hide by changing colour",
]

# The sentence drawn in attention.png: short enough for readable token labels.
PICTURE_SENTENCE = "The cat sat on the mat because it was tired."


def search(model, corpus_emb: np.ndarray, query: str, top: int = 3) -> list[tuple[int, float]]:
    """``[(corpus index, cosine similarity)]`` of the ``top`` best matches."""
    q = model.encode([query])[0]
    scores = corpus_emb @ q  # embeddings are unit length: dot product = cosine
    best = np.argsort(-scores, kind="stable")[:top]
    return [(int(i), float(scores[i])) for i in best]


def run_search(args) -> dict:
    """Everything the demo computes, for the console and the tests."""
    from ..models import MiniLM
    from ..viz import plot_attention, sentence_attention
    from .long_map import long_sequence_maps, plot_maps

    folder = out_dir(args)
    timings: dict[str, float] = {}
    corpus = CORPUS[:10] if args.quick else CORPUS
    queries = QUERIES[:2] if args.quick else QUERIES
    n_long, pool = (2048, 64) if args.quick else (16384, 128)

    with stopwatch(timings, "load model"):
        model = MiniLM()
    batch_size = 8
    chunks = [corpus[i : i + batch_size] for i in range(0, len(corpus), batch_size)]
    parts = []
    with progress() as bar:
        task = bar.add_task("encoding corpus", total=len(corpus), note="")
        with stopwatch(timings, "encode corpus"):
            for chunk in chunks:
                parts.append(model.encode(chunk))
                bar.update(task, advance=len(chunk), note=f"{len(chunk)} sentences/batch")
        corpus_emb = np.concatenate(parts)
        task = bar.add_task("answering queries", total=len(queries), note="")
        results = []
        with stopwatch(timings, "queries"):
            for query in queries:
                results.append((query, search(model, corpus_emb, query)))
                bar.advance(task)
        task = bar.add_task("attention.png", total=1, note="")
        with stopwatch(timings, "attention.png"):
            tokens, weights = sentence_attention(model, PICTURE_SENTENCE)
            attention_png = plot_attention(
                tokens, weights, folder / "attention.png",
                title=f"all-MiniLM-L6-v2 on dotattn — {PICTURE_SENTENCE!r} (rows: queries, columns: keys)",
            )
            bar.advance(task)
        task = bar.add_task(f"{n_long:,}-token maps", total=4, note="")
        with stopwatch(timings, f"attention_map {n_long:,} tokens"):
            maps = long_sequence_maps(n=n_long, pool=pool, seed=args.seed, on_head=lambda title: bar.update(task, advance=1, note=title))
            map_png = folder / "attention_map_16k.png"
            plot_maps(maps, n_long, pool, map_png)
    return dict(
        corpus=corpus, results=results, timings=timings, tokens=tokens, weights=weights,
        attention_png=attention_png, maps=maps, map_png=map_png, n_long=n_long, pool=pool,
    )


def run(args) -> int:
    from rich.table import Table

    start = time.perf_counter()
    try:
        r = run_search(args)
    except FileNotFoundError as exc:  # the model package is missing: say how to install it
        console.print(f"[red]dotattn demo: {exc}[/red]")
        return 1
    corpus = r["corpus"]
    for query, hits in r["results"]:
        table = Table(title=f"[bold]query:[/bold] {query}", title_justify="left", show_header=True)
        table.add_column("#", justify="right")
        table.add_column("score", justify="right")
        table.add_column("sentence")
        for rank, (i, score) in enumerate(hits, 1):
            table.add_row(str(rank), f"{score:.3f}", corpus[i])
        console.print(table)
    timing = Table(title="timings", title_justify="left")
    timing.add_column("step")
    timing.add_column("seconds", justify="right")
    for name, seconds in r["timings"].items():
        timing.add_row(name, f"{seconds:.2f}")
    timing.add_row("total", f"{time.perf_counter() - start:.2f}")
    console.print(timing)
    console.print(
        f"{len(corpus)} sentences encoded at {len(corpus) / r['timings']['encode corpus']:.0f} sentences/s; "
        f"every attention call went through dotattn.attention (kv_lengths for padding)."
    )
    console.print(f"wrote {r['attention_png']} and {r['map_png']}")
    # The main job's second half: a chat model generating on dotattn (prefill + KV-cache decode).
    from .generate import run as run_generate

    return run_generate(args)
