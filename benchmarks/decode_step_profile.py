"""Where a SmolLM2 decode step's time goes: layer products, attention calls, the rest.

Generates ``--new`` tokens after a random ``--context``-token prompt, three times, with
``perf_counter`` wrappers around ``_MatMul.__call__`` (the layers' projections, inside decode
steps) and ``_Caches.attend`` (the 30 attention calls); "rest" holds the head's product,
element-wise steps and sampling::

    PYTHONPATH=src .venv/bin/python benchmarks/decode_step_profile.py --context 4096

Run under ``flock /tmp/bench.lock`` on a shared machine and write ``uptime`` beside figures
(the wrappers add ≈ 1 µs a product).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    import dotattn.models.smollm as sm

    model = sm.SmolLM()
    ids = np.random.default_rng(0).integers(100, 40000, args.context).tolist()
    model.generate_ids(ids, max_new_tokens=4, stop_at_eos=False)  # warm-up (compiles, thread choices)
    acc = {"mm": 0.0, "attend": 0.0, "in_step": False}
    matmul, attend, step = sm._MatMul.__call__, sm._Caches.attend, sm.SmolLM._decode_step

    def timed_matmul(self, x, w, out=None):
        t0 = time.perf_counter()
        result = matmul(self, x, w, out)
        if acc["in_step"]:
            acc["mm"] += time.perf_counter() - t0
        return result

    def timed_attend(self, *a, **k):
        t0 = time.perf_counter()
        result = attend(self, *a, **k)
        if acc["in_step"]:
            acc["attend"] += time.perf_counter() - t0
        return result

    def timed_step(self, *a):
        acc["in_step"] = True
        try:
            return step(self, *a)
        finally:
            acc["in_step"] = False

    sm._MatMul.__call__, sm._Caches.attend, sm.SmolLM._decode_step = timed_matmul, timed_attend, timed_step
    for _ in range(args.rounds):
        acc["mm"] = acc["attend"] = 0.0
        model.generate_ids(ids, max_new_tokens=args.new, stop_at_eos=False)
        stats = model.last_stats
        n = stats.new_tokens - 1  # decode steps (the first token comes from the prompt pass)
        per = lambda seconds: seconds / n * 1e3  # noqa: E731
        print(f"context {args.context}: decode {stats.decode_tokens_per_s:.1f} tok/s = {per(stats.decode_seconds):.1f} ms "
              f"a step: layer products {per(acc['mm']):.1f}, attention {per(acc['attend']):.1f}, "
              f"rest {per(stats.decode_seconds - acc['mm'] - acc['attend']):.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
