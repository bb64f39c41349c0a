"""Peak extra memory of the cpu backend at Lq = Lk = 65,536 (H1, D64, float32, forward).

The target: ≤ 64 MiB beyond the inputs (a materialized score matrix would be 16 GiB).  The
script measures the growth of resident memory during the call (sampled every millisecond)
and, separately, what NumPy allocated (tracemalloc: the output, LSE and packing only; the
kernels' per-thread block scratch is allocated by Numba, which tracemalloc does not see).

    .venv/bin/python benchmarks/cpu_long_sequence_memory.py [--length 65536]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

import dotattn
from dotattn.bench import _PeakRss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--causal", action="store_true")
    args = parser.parse_args()
    L = args.length
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 1, L, 64), dtype=np.float32) for _ in range(3))
    inputs_mib = 3 * q.nbytes / 2**20
    dotattn.attention(q[..., :256, :], k[..., :256, :], v[..., :256, :], implementation="cpu")  # load kernels
    tracemalloc.start()
    with _PeakRss() as mem:
        t0 = time.perf_counter()
        out = dotattn.attention(q, k, v, implementation="cpu", causal=args.causal)
        seconds = time.perf_counter() - t0
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    flop = 4.0 * L * L * 64 / (2 if args.causal else 1)
    print(
        f"L={L} H1 D64 float32 {'causal' if args.causal else 'dense'} forward: {seconds:.2f} s, {flop / seconds / 1e9:.1f} GFLOP/s"
    )
    print(f"inputs q+k+v: {inputs_mib:.0f} MiB; output: {out.nbytes / 2**20:.0f} MiB")
    print(f"peak extra resident memory during the call: {mem.extra_mib:.1f} MiB (output included)")
    print(f"peak NumPy allocations (tracemalloc): {traced_peak / 2**20:.1f} MiB")
    print(f"a materialized float32 score matrix would be {L * L * 4 / 2**30:.0f} GiB")


if __name__ == "__main__":
    main()
