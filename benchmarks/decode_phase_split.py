"""Where a decode work item's time goes, per key and K/V head, one thread (docs/decoding-log.md,
"AMX scores for GQA decode").

The bench's B1 shape (one query, Hq 32, Hkv 8: R = 4 rows per K/V head, D 128) at CONTEXT keys,
every (K/V head, 256-key chunk) of the sequence in turn — the call's items without its Python,
partners or merges — as cumulative phases of the 16-lane path:

* ``scores``: ``_fill_offsets`` + the 16-lane scores pass (k widened to float32, FMAs), which
  also asks for the next key block (into L1) and the block's value rows (into L2);
* ``+exp``: the row max and ``exp``/row sum of the R rows;
* ``+pv``: the ``P·V`` pass;
* ``item``: ``_chunk`` itself (the above plus its allocations, masks, NaN check, normalize).

    flock /tmp/bench.lock env PYTHONPATH=src python benchmarks/decode_phase_split.py [CONTEXT] [bfloat16|float16] [ROUNDS]

Prints min and median ns per key and K/V head over ROUNDS rounds (each: 20 passes over the
sequence per variant, variants alternating) and the load.
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
from numba import njit

from dotattn.kernels import _cpu_decode_kernels as K
from dotattn.semantics import BFLOAT16

L = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
DT = sys.argv[2] if len(sys.argv) > 2 else "bfloat16"
ROUNDS = int(sys.argv[3]) if len(sys.argv) > 3 else 7
HQ, HKV, D, SPLIT = 32, 8, 128, 256
R = HQ // HKV
KIND = K.KIND_BF16 if DT == "bfloat16" else K.KIND_F16

rng = np.random.default_rng(0)
dtype = BFLOAT16 if DT == "bfloat16" else np.float16
kc = rng.standard_normal((1, HKV, L, D), dtype=np.float32).astype(dtype)
vc = rng.standard_normal((1, HKV, L, D), dtype=np.float32).astype(dtype)
q = rng.standard_normal((HKV * R * D,), dtype=np.float32).astype(dtype).astype(np.float32)
qs = q * np.float32(1 / np.sqrt(D))  # the pre-scaled q of the widening path
qp = (q.view(np.uint32) >> 16).astype(np.uint16)
kflat, vflat = kc.reshape(-1).view(np.uint16), vc.reshape(-1).view(np.uint16)
st = np.array([HKV * L * D, L * D, D, HKV], np.int64)  # (B, Hkv, L, D): one page of L rows
table = np.zeros((1, 1), np.int64)


@njit
def phases(reps, upto, qs):
    """upto: 1 scores, 2 +exp, 3 +pv."""
    koffs = np.empty(SPLIT, np.int64)
    voffs = np.empty(SPLIT, np.int64)
    pk = np.empty(1, np.int64)
    s = np.empty(R * SPLIT, np.float32)
    o = np.empty(R * D, np.float32)
    for _ in range(reps):
        for hk in range(HKV):
            for c in range(L // SPLIT):
                K._fill_offsets(st, table, L, 0, hk, c * SPLIT, SPLIT, koffs)
                K._fill_offsets(st, table, L, 0, hk, c * SPLIT, SPLIT, voffs)
                K._scores_simd(qs[hk * R * D:(hk + 1) * R * D], R, D, kflat, KIND, koffs, SPLIT, s, SPLIT,
                               vflat, voffs, D, pk, 0)
                if upto >= 2:
                    for r in range(R):
                        m, _bad = K._row_max(s, r * SPLIT, (r + 1) * SPLIT)
                        K._exp_sum_simd(s, r * SPLIT, SPLIT, m)
                if upto >= 3:
                    K._pv_simd(s, SPLIT, R, SPLIT, vflat, KIND, voffs, D, o, vflat, pk, 0, D)
    return o


@njit
def items(reps, qs, qp):
    kcs = np.empty(SPLIT * D, np.float32)
    vcs = np.empty(SPLIT * D, np.float32)
    offs = np.empty(4 * SPLIT, np.int64)
    o_out = np.empty((R, D), np.float32)
    lse = np.empty(R, np.float32)
    slopes = np.zeros((1, 1), np.float32)
    work = np.empty(K._work_size(R, D, D, SPLIT), np.float32)  # the entries' per-thread scratch
    ibuf = np.empty(SPLIT, np.int32)
    for _ in range(reps):
        for hk in range(HKV):
            qf = qs[hk * R * D:(hk + 1) * R * D].copy()
            qph = qp[hk * R * D:(hk + 1) * R * D].copy()
            for c in range(L // SPLIT):
                K._chunk(qf, R, 0, hk, c * SPLIT, (c + 1) * SPLIT, kflat, st, vflat, st, table, L, KIND, D, D,
                         R, 1, L - 1, False, -1, -1, 0.0, slopes, False, o_out, lse, kcs, vcs, offs, 0,
                         qph, np.float32(1.0), False, work, ibuf)
    return o_out


def main() -> None:
    variants = {"scores": 1, "+exp": 2, "+pv": 3, "item": 0}

    def call(upto, reps):
        return phases(reps, upto, qs) if upto else items(reps, qs, qp)

    for v in variants.values():
        call(v, 1)
    res = {n: [] for n in variants}
    for _ in range(ROUNDS):
        for n, v in variants.items():
            t = time.perf_counter()
            call(v, 20)
            res[n].append((time.perf_counter() - t) / 20 / (L * HKV) * 1e9)
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(f"B1 {L} {DT}, R {R}, D {D}, one thread, ns per key and K/V head (min / median of {ROUNDS}), load {load}")
    for n, v in res.items():
        print(f"  {n:14s} {min(v):6.2f} / {statistics.median(v):6.2f}")


if __name__ == "__main__":
    main()
