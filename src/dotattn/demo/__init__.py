"""``dotattn demo [search|translate|scaling|memory]`` — dotattn doing real work, with pictures.

* ``search`` (the default, what ``make demo`` runs): all-MiniLM-L6-v2 on dotattn encodes a
  small corpus and answers semantic-search queries; writes ``attention.png`` (every layer ×
  head of one sentence) and ``attention_map_16k.png`` (block-averaged maps of a
  16,384-token sequence from :func:`dotattn.attention_map`).
* ``translate``: an encoder–decoder Transformer learns spelled-out dates → ISO dates;
  writes ``cross_attention.png``.
* ``scaling``: why scores are divided by √d_k (seed 003); writes ``scaling.png``.
* ``memory``: naive O(N²) attention vs dotattn, peak memory and time (seed 002); writes
  ``memory.png``.
* ``generate``: SmolLM2-135M-Instruct (a Llama chat model) answers one question on dotattn
  and prints its prefill and decode tokens/s; ``search`` ends with it too.

Pictures go to ``--out`` (default ``demo-out/``).  ``--quick`` runs small settings (tests).
"""

from __future__ import annotations

import argparse
import os
import importlib

# demo name → (module, one-line description)
DEMOS = {
    "search": ("dotattn.demo.search", "semantic search with all-MiniLM-L6-v2 on dotattn + attention pictures"),
    "translate": ("dotattn.demo.translate", "train a small encoder–decoder on spelled-out dates"),
    "scaling": ("dotattn.demo.scaling", "what the 1/√d_k factor does to scores, softmax and gradients"),
    "memory": ("dotattn.demo.memory", "peak memory and time: naive O(N²) attention vs dotattn"),
    "generate": ("dotattn.demo.generate", "SmolLM2-135M-Instruct answers a question on dotattn, with tokens/s"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "which",
        nargs="?",
        default="search",
        choices=list(DEMOS),
        help="; ".join(f"{name}: {desc}" for name, (_, desc) in DEMOS.items()) + " (default: search)",
    )
    parser.add_argument("--out", type=_out_folder, default="demo-out",
                        help="folder for the pictures (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="small settings: seconds instead of minutes")
    parser.add_argument("--seed", type=_seed, default=0, help="random seed, ≥ 0 (default: %(default)s)")


# Checked as the arguments are parsed (a usage error, exit status 2): a negative seed reached
# NumPy's default_rng mid-demo, and a --out naming a file failed at the end, after the work —
# both as tracebacks (until 7 Dec 2026).
def _seed(text: str) -> int:
    value = int(text)  # (a non-integer: argparse's "invalid int value", named so below)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {value}")
    return value


_seed.__name__ = "int"  # (argparse names the type in its message: "invalid int value: 'x'")


def _out_folder(text: str) -> str:
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder")
    return text


def run(args: argparse.Namespace) -> int:
    module_name, _ = DEMOS[args.which]
    return int(importlib.import_module(module_name).run(args) or 0)
