"""``dotattn chat`` — talk to SmolLM2-135M-Instruct on dotattn in the terminal.

Each reply streams as it is generated.  The whole conversation is the prompt of the next
reply (formatted by the model's chat template).  ``/reset`` starts a new conversation;
Ctrl-D (end of input) or ``/quit`` leaves; Ctrl-C stops a reply early.
"""

from __future__ import annotations

import argparse
import sys

from .cli_generate import (
    add_sampling_arguments,
    check_sampling_arguments,
    has_chat_template,
    load_model,
    model_text,
    print_error,
    stats_line,
    usage_error,
)

HELP = "type a message; /reset starts over, /quit or Ctrl-D leaves, Ctrl-C stops a reply"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_sampling_arguments(parser, max_new_tokens=256)
    parser.add_argument("--system", default=None, help="a system message (default: the chat template's own)")
    parser.add_argument("--stats", action="store_true", help="print tokens/s after each reply")


def run(args: argparse.Namespace) -> int:
    from .errors import DotAttnError

    check_sampling_arguments(args)  # before the model loads, and before the prompt appears
    model = load_model(args.model)
    if model is None or not has_chat_template(model, "chat"):
        return 1
    start = [{"role": "system", "content": model_text(args.system)}] if args.system else []
    context = model.config.context_length
    try:  # the shortest chat: the template and a one-word message
        floor = len(model.chat_ids(start + [{"role": "user", "content": "Hi"}]))
    except (ImportError, DotAttnError) as exc:  # jinja2 missing, the template refusing the chat
        print_error(exc)
        return 1
    if floor > context:
        usage_error(args, f"--system takes {floor} tokens with the chat template, more than the model's context of {context}")
    if floor + args.max_new_tokens > context:
        usage_error(
            args,
            f"--max-new-tokens {args.max_new_tokens} leaves no room for a message in the model's context of "
            f"{context} tokens (the chat template and a one-word message take {floor}); give at most {context - floor}",
        )
    try:  # bytes the locale cannot decode come as surrogates (model_text), not as UnicodeDecodeError
        sys.stdin.reconfigure(errors="surrogateescape")
    except (AttributeError, ValueError):  # (a replaced stdin: StringIO)
        pass
    messages = list(start)
    print(f"SmolLM on dotattn — {HELP}", flush=True)
    # the prompt where someone types; messages piped in get none, as Python's own REPL does, so
    # that the output holds the replies alone
    prompt = ">>> " if sys.stdin.isatty() else ""
    while True:
        try:
            line = model_text(input(prompt))
        except EOFError:  # Ctrl-D
            print()
            return 0
        except KeyboardInterrupt:
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            messages = list(start)
            print("(conversation reset)", flush=True)
            continue
        messages.append({"role": "user", "content": line})
        try:
            prompt_tokens = len(model.chat_ids(messages))
        except DotAttnError as exc:  # e.g. the template refusing the conversation
            messages.pop()
            print(f"dotattn chat: {exc} (try /reset)", file=sys.stderr, flush=True)
            continue
        if prompt_tokens + args.max_new_tokens > context:
            messages.pop()
            print(
                f"dotattn chat: the conversation and this message take {prompt_tokens} tokens; with "
                f"--max-new-tokens {args.max_new_tokens} the reply would pass the model's context of {context} "
                "tokens (/reset starts over)",
                file=sys.stderr,
                flush=True,
            )
            continue
        reply = []
        try:
            for piece in model.generate(
                messages,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed,
                stream=True,
            ):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:  # stop this reply, keep the conversation
            if not reply:  # (stopped before a word of it: the message is withdrawn, not answered by nothing)
                messages.pop()
                print("\n(stopped before the reply began; the message was not kept)", flush=True)
                continue
        except DotAttnError as exc:  # e.g. the conversation outgrew the context
            messages.pop()
            print(f"\ndotattn chat: {exc} (try /reset)", file=sys.stderr, flush=True)
            continue
        print(flush=True)
        messages.append({"role": "assistant", "content": "".join(reply)})
        if args.stats:
            print(stats_line(model.last_stats), file=sys.stderr, flush=True)
