"""Do two versions of the cpu decode kernels give the same bits?  Every route, not only the bench's.

Each FILE is a copy of ``src/dotattn/kernels/_cpu_decode_kernels.py`` (or ``new``, the one
imported with dotattn), loaded as ``decode_ab.py`` loads them.  Random cases — float32,
float16, bfloat16 (with one query row per K/V head: the ``vdpbf16ps`` scores) and float64 caches, contiguous
and paged, one and several query rows, with no option and with softcap, ALiBi, a window — run
on each version, on the pool and alone; prints, per case, whether the outputs and LSEs are
bitwise equal to the first version's, and the largest difference where not.  A change meant to
keep the arithmetic (a prefetch, a loop order with the same sums, a rare path) should print
``same`` everywhere; on 4 Dec 2026 it caught a one-ulp change in the fused pass's row sums that
a restructured loop had brought in (``reassoc`` let LLVM sum the lanes in another order).

    git show main:src/dotattn/kernels/_cpu_decode_kernels.py > /tmp/old.py
    PYTHONPATH=src python benchmarks/decode_bits.py /tmp/old.py new
"""

from __future__ import annotations

import sys

import numpy as np

from decode_ab import kernel_versions

import dotattn
from dotattn.kernels import cpu_decode
from dotattn.semantics import BFLOAT16

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": BFLOAT16, "float64": np.float64}
OPTIONS = {"plain": {}, "softcap": {"softcap": 20.0}, "alibi": "alibi", "window": {"window": (700, 0)}}


def _case(rng, dtype, B, Lq, context, paged):
    Hkv, D = 2, 64
    Hq = Hkv if B == 1 and Lq == 1 else 4 * Hkv  # one row per K/V head: bfloat16's vdpbf16ps route
    q = rng.standard_normal((B, Hq, Lq, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, context, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, context, D)).astype(dtype)
    lengths = rng.integers(Lq, context + 1, size=B) - Lq
    kw = {}
    if paged:
        page = 64
        per = -(-context // page)
        table = rng.permutation(B * per).reshape(B, per)
        kp = np.full((B * per, Hkv, page, D), np.nan, dtype)  # the last page's unused slots: NaN, never read
        vp = np.full_like(kp, np.nan)
        for b in range(B):
            for i in range(per):
                n = min(page, context - i * page)
                kp[table[b, i], :, :n] = k[b, :, i * page:i * page + n]
                vp[table[b, i], :, :n] = v[b, :, i * page:i * page + n]
        k, v, kw = kp, vp, {"block_table": table}
    return q, k, v, lengths, kw


def main() -> None:
    if len(sys.argv) < 3:
        print(__doc__)
        raise SystemExit(2)
    mods = kernel_versions(sys.argv[1:])
    names = list(mods)
    differ = 0
    for dt_name, dt in DTYPES.items():
        for opt_name, opts in OPTIONS.items():
            for B, Lq, context, paged in ((1, 1, 1000, False), (3, 2, 700, True)):
                for pool in (True, False):
                    rng = np.random.default_rng(len(dt_name) * 31 + len(opt_name) * 7 + B)
                    q, k, v, lengths, kw = _case(rng, dt, B, Lq, context, paged)
                    call = dict(kw, **({"alibi_slopes": np.linspace(0.01, 0.3, q.shape[1])} if opts == "alibi" else opts))
                    cpu_decode.ParallelChoice.choose = lambda self, pool=pool: pool
                    results = {}
                    for n in names:
                        cpu_decode.K = mods[n]
                        out, lse = dotattn.attention_with_kvcache(
                            q, k.copy(), v.copy(), cache_lengths=lengths, implementation="cpu", return_lse=True, **call
                        )
                        results[n] = (np.asarray(out, np.float64), np.asarray(lse, np.float64))
                    first = results[names[0]]
                    cells = []
                    for n in names[1:]:
                        o, l_ = results[n]
                        same = np.array_equal(o, first[0], equal_nan=True) and np.array_equal(l_, first[1], equal_nan=True)
                        differ += not same
                        cells.append(f"{n} same" if same else
                                     f"{n} DIFFERS (out {np.nanmax(np.abs(o - first[0])):.3g}, lse {np.nanmax(np.abs(l_ - first[1])):.3g})")
                    where = f"B{B} Lq{Lq} {context} {'paged' if paged else 'contiguous'} {'pool' if pool else 'alone'}"
                    print(f"{dt_name:8s} {opt_name:7s} {where:30s} " + "; ".join(cells), flush=True)
    print(f"{differ} case(s) differ")


if __name__ == "__main__":
    main()
