"""The ``dotattn`` command: ``bench | demo | viz | info | generate | chat | precompile``.

Each subcommand lives in its own module and is imported only when run, so ``dotattn info``
starts fast and never imports a framework.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand → (module, help); each module has ``add_arguments(parser)`` and ``run(args) -> int``
SUBCOMMANDS = {
    "info": ("dotattn.cli_info", "list backends and whether they can run here"),
    "bench": ("dotattn.bench", "benchmark dotattn against the peers in one process"),
    "demo": ("dotattn.demo", "the main job: a pretrained Transformer on dotattn, and the seeds' experiments"),
    "viz": ("dotattn.viz", "plot the attention maps of a sentence"),
    "generate": ("dotattn.cli_generate", "answer one prompt with SmolLM2-135M-Instruct on dotattn (streamed)"),
    "chat": ("dotattn.cli_chat", "chat with SmolLM2-135M-Instruct on dotattn (/reset, Ctrl-D to leave)"),
    "precompile": ("dotattn.cli_precompile", "compile the cpu kernels once (make install runs it)"),
}


def main(argv: list[str] | None = None) -> int:
    _tolerant_stdout()
    parser = argparse.ArgumentParser(
        prog="dotattn", description="dotattn — exact, fast, memory-efficient attention: bench | demo | viz | info | generate | chat | precompile"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(_module=module_name)
        # Only the chosen subcommand's module is imported to add its arguments.
        chosen = argv if argv is not None else sys.argv[1:]
        if chosen[:1] == [name]:
            importlib.import_module(module_name).add_arguments(p)
    args = parser.parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C while a model loads, a bench runs, a reply streams: no traceback
        print("\ndotattn: interrupted", file=sys.stderr, flush=True)
        return 130  # (128 + SIGINT, as shells report it)
    except BrokenPipeError:  # the reader of our output has gone (`dotattn generate ... | head`)
        _silence_stdout()
        return 141  # (128 + SIGPIPE: what a shell reports for a program its pipe's end stopped)
    except SystemExit as exc:
        # rich's console meets the closed pipe itself (`dotattn bench ... | head -1`): it points
        # stdout at /dev/null and raises SystemExit(1) from the BrokenPipeError — a failure's status
        if isinstance(exc.__context__, BrokenPipeError):
            return 141
        raise


def _tolerant_stdout() -> None:
    """Characters stdout cannot encode become ``?`` instead of raising UnicodeEncodeError.

    The commands print ``—``, ``×``, ``≥`` and rich's box drawing, and the model's replies any
    text; where the locale's encoding is ASCII (``LC_ALL=C``, ``PYTHONIOENCODING=ascii``) the
    first of them ended the command with a traceback and exit status 1.  An error handler the
    user named (``PYTHONIOENCODING=ascii:strict``, ``…:backslashreplace``) is theirs: kept."""
    if os.environ.get("PYTHONIOENCODING", "").partition(":")[2]:
        return
    if sys.stdout is not None and (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "") != "utf8":
        try:
            sys.stdout.reconfigure(errors="replace")
        except (AttributeError, ValueError):  # (a replaced stdout: StringIO, a capture)
            pass


def _silence_stdout() -> None:
    """Point stdout at /dev/null: Python flushes it at exit, and the pipe would raise again
    (the recipe of Python's docs, "Note on SIGPIPE")."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # (a stream with no descriptor: nothing to flush to a pipe)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
