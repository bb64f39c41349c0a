"""Where transformers' SmolLM2 prompt pass goes: its linear layers against its attention calls.

The peer side of ``prefill_profile.py``: ``transformers`` loads the same GGUF as
``dotattn.models.SmolLM`` (float32, as ``generate.py``'s peer), then runs ``--rounds`` forward
passes of a ``--length``-token prompt (no cache, the last token's logits only) with every
``torch.nn.Linear`` timed by forward hooks and ``F.scaled_dot_product_attention`` wrapped::

    PYTHONPATH=src .venv/bin/python benchmarks/transformers_profile.py --length 4096 --rounds 3

Run under ``flock /tmp/bench.lock`` on a shared machine and write ``uptime`` beside figures.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).parent))
    import generate  # benchmarks/generate.py: the peer's loader and the prompt

    from dotattn.models import SmolLM

    ours = SmolLM()
    ids = generate.prompt_ids(ours, args.length)
    model, info = generate.load_transformers(ours.path)
    if model is None:
        print(info)
        return 1
    print(info, "attention:", model.config._attn_implementation, flush=True)

    seconds: dict[str, float] = collections.defaultdict(float)
    counts: collections.Counter = collections.Counter()
    sdpa = F.scaled_dot_product_attention

    def timed_sdpa(*a, **k):
        t0 = time.perf_counter()
        try:
            return sdpa(*a, **k)
        finally:
            seconds["attention"] += time.perf_counter() - t0
            counts["attention"] += 1

    started: dict[int, float] = {}

    def before(module, _inputs):
        started[id(module)] = time.perf_counter()

    def after(module, _inputs, _output):
        seconds["linear"] += time.perf_counter() - started[id(module)]
        counts["linear"] += 1

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(before)
            module.register_forward_hook(after)
    F.scaled_dot_product_attention = timed_sdpa  # (transformers' sdpa integration looks it up per call)
    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    x = torch.tensor([ids])
    try:
        for _ in range(args.rounds):
            seconds.clear()
            counts.clear()
            with torch.no_grad():
                t0 = time.perf_counter()
                model(x, use_cache=False, logits_to_keep=1)
                total = time.perf_counter() - t0
            parts = ", ".join(f"{k} {v:.2f} s ({counts[k]})" for k, v in seconds.items())
            print(f"{args.length} tokens: {args.length / total:.1f} tok/s = {total:.2f} s: {parts}, "
                  f"rest {total - sum(seconds.values()):.2f} s", flush=True)
    finally:
        F.scaled_dot_product_attention = sdpa
    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
