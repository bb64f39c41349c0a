"""The paged cache against the contiguous one, and what the pages' order costs (docs/decoding-log.md,
"The paged cache against the contiguous one").

One decode step of the bench's shape (one query token per sequence, Hq 32, Hkv 8, D 128,
:mod:`dotattn.bench_decode`'s inputs), three ways in one process on the same keys and values:
``contig`` (a ``(B, Hkv, context, D)`` cache), ``paged-order`` (pages of ``--page`` tokens,
sequence b's pages in order, one after another in the pool) and ``paged-shuffled`` (the same
pages at shuffled places: the bench's ``dotattn-paged``).  All three give the same bits
(checked first).  Each round times every layout once, in a random order, after
``bench_decode.warm_up``; prints the median per layout and the paged ones over ``contig``.
Run under ``flock /tmp/bench.lock`` on a shared machine:

    PYTHONPATH=src .venv/bin/python benchmarks/decode_paged_order.py 8 32768 float16 --rounds 15
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np

import dotattn
from dotattn import bench_decode as bd


def paged_pool(kc, vc, table, page: int):
    """``(pages_k, pages_v)``: the contiguous caches' tokens copied into the pages ``table`` names."""
    B, per_seq = table.shape
    pages_k = np.empty((B * per_seq, kc.shape[1], page, kc.shape[3]), dtype=kc.dtype)
    pages_v = np.empty_like(pages_k)
    for b in range(B):
        for i in range(per_seq):
            pages_k[table[b, i]] = kc[b, :, i * page : (i + 1) * page]
            pages_v[table[b, i]] = vc[b, :, i * page : (i + 1) * page]
    return pages_k, pages_v


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("batch", type=int)
    parser.add_argument("context", type=int)
    parser.add_argument("dtype", choices=bd.DTYPES)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--page", type=int, default=bd.PAGE)
    args = parser.parse_args()
    B, context, page = args.batch, args.context, args.page
    if context % page:
        parser.error(f"context {context} must be a multiple of --page {page}")
    q, kc, vc = bd.case_inputs(B, context, args.dtype)
    lengths = np.full(B, context, dtype=np.int64)
    in_order = np.arange(B * (context // page)).reshape(B, -1)
    shuffled = np.random.default_rng(1).permutation(in_order.size).reshape(in_order.shape)
    pools = {name: paged_pool(kc, vc, t, page) for name, t in (("order", in_order), ("shuffled", shuffled))}
    calls = {
        "contig": lambda: dotattn.attention_with_kvcache(q, kc, vc, cache_lengths=lengths, implementation="cpu"),
        "paged-order": lambda: dotattn.attention_with_kvcache(
            q, *pools["order"], cache_lengths=lengths, block_table=in_order, implementation="cpu"),
        "paged-shuffled": lambda: dotattn.attention_with_kvcache(
            q, *pools["shuffled"], cache_lengths=lengths, block_table=shuffled, implementation="cpu"),
    }
    expected = calls["contig"]()
    for name, call in calls.items():
        if not np.array_equal(np.asarray(call()).view(np.uint8), np.asarray(expected).view(np.uint8)):
            raise SystemExit(f"{name} differs from contig in its bits")
    times = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name in random.sample(list(calls), len(calls)):
            time.sleep(bd.PAUSE_S)
            bd.warm_up(calls[name], bd.WARMUP_S)
            t0 = time.perf_counter()
            calls[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
    ms = {name: statistics.median(t) for name, t in times.items()}
    print(f"B{B} {context} {args.dtype}, pages of {page}, {args.rounds} rounds: "
          + ", ".join(f"{name} {m:.2f} ms" for name, m in ms.items())
          + f"; order/contig {ms['paged-order'] / ms['contig']:.3f}, shuffled/contig "
          f"{ms['paged-shuffled'] / ms['contig']:.3f}; load {bd.load_average()}")


if __name__ == "__main__":
    main()
