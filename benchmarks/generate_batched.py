"""Batched generation on SmolLM2: the time of a decode step of B sequences, and tokens/s.

One model; each round generates ``--new`` tokens after B random prompts of ``--prompt``
tokens, for every B of ``--batches``, once per side in alternating order:

- ``new``: the working tree as it is;
- ``old``: the same code with :class:`dotattn.models.smollm._MatMul`'s block-weight GEMM off
  (``BLOCK_GEMM_MIN_ROWS`` past its max: one token row per pass of the codes up to
  ``GEMV_MAX_ROWS`` sequences, then ``_RowHalves``' MKL chunks on float32 weights).

Printed per B: the median decode-step time of each side (ms), their ratio, and the
tokens/s of the batch (B / step)::

    PYTHONPATH=src .venv/bin/python benchmarks/generate_batched.py --batches 1 4 8 12 16 24 32 --rounds 3 [--threads one]

Run under ``flock /tmp/bench.lock`` on a shared machine; the load is printed with each run.
"""

from __future__ import annotations

import argparse
import os
import statistics

import numpy as np


def step_ms(model, batch: list[list[int]], new: int) -> float:
    model.generate_ids(batch, max_new_tokens=new, stop_at_eos=False)
    stats = model.last_stats
    steps = new - 1
    return stats.decode_seconds / steps * 1e3


def main(argv=None) -> int:
    from dotattn.models import SmolLM
    from dotattn.models import smollm as smollm_module

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 12, 16, 24, 32])
    parser.add_argument("--prompt", type=int, default=20, help="tokens of each prompt")
    parser.add_argument("--new", type=int, default=17, help="new tokens per sequence")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", choices=["auto", "one", "all"], default="auto",
                        help="the decode steps' thread mode: the model's chooser (auto), or forced")
    args = parser.parse_args(argv)

    model = SmolLM()
    mm = smollm_module._MatMul
    if args.threads != "auto":  # a forced mode: on a busy machine, one thread's figures are the steadier
        smollm_module._StepThreads.choose = lambda self, many=args.threads == "all": many
    sides = {"new": mm.BLOCK_GEMM_MIN_ROWS, "old": mm.BLOCK_GEMM_MAX_ROWS + 1}
    rng = np.random.default_rng(0)
    prompts = {B: rng.integers(100, 40000, (B, args.prompt)).tolist() for B in args.batches}
    print(f"load before: {' '.join(os.getloadavg().__repr__().strip('()').split(', '))}")
    times = {(B, side): [] for B in args.batches for side in sides}
    for B in args.batches:  # warm-up: every kernel compiled or loaded, every buffer made
        for side, minimum in sides.items():
            mm.BLOCK_GEMM_MIN_ROWS = minimum
            step_ms(model, prompts[B], 3)
    for r in range(args.rounds):
        for B in args.batches:
            order = list(sides.items()) if r % 2 == 0 else list(sides.items())[::-1]
            for side, minimum in order:
                mm.BLOCK_GEMM_MIN_ROWS = minimum
                times[(B, side)].append(step_ms(model, prompts[B], args.new))
    mm.BLOCK_GEMM_MIN_ROWS = sides["new"]
    print(f"load after: {' '.join(os.getloadavg().__repr__().strip('()').split(', '))}")
    print(f"{'B':>4} {'old ms':>9} {'new ms':>9} {'old/new':>8} {'new tok/s':>10}")
    for B in args.batches:
        old, new = statistics.median(times[(B, 'old')]), statistics.median(times[(B, 'new')])
        print(f"{B:>4} {old:9.1f} {new:9.1f} {old / new:8.2f} {B / new * 1e3:10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
