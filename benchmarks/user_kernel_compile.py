"""A user ``mask_mod``'s first forward and backward (the kernels compiled for it), then the
calls' medians: ``python benchmarks/user_kernel_compile.py [--repeats 9]``.

The first calls compile unless the user-kernel cache (``$DOTATTN_CACHE_DIR/user_kernels``)
has the kernels already: the script points ``DOTATTN_CACHE_DIR`` at a fresh temporary folder
unless ``--keep-cache`` is given (then a second run times the calls alone).  For an A/B of two
trees, run it once per tree, alternating, with the same arguments.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

WIDTH = 256


def band(b, h, q_idx, kv_idx):
    return abs(q_idx - kv_idx) <= WIDTH


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--shape", type=int, nargs=4, default=(1, 8, 2048, 64), metavar=("B", "H", "L", "D"))
    parser.add_argument("--keep-cache", action="store_true", help="use $DOTATTN_CACHE_DIR as it is")
    args = parser.parse_args()
    if not args.keep_cache:
        os.environ["DOTATTN_CACHE_DIR"] = tempfile.mkdtemp(prefix="dotattn-user-kernels-")
    from dotattn import semantics
    from dotattn.kernels import cpu

    B, H, L, D = args.shape
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, H, L, D)).astype(np.float32) for _ in range(3))
    call = semantics.normalize(q, k, v, extras=dict(mask_mod=band))
    started = time.perf_counter()
    out, lse = cpu.forward(call)
    first_forward = time.perf_counter() - started
    started = time.perf_counter()
    cpu.backward(call, out, lse, out, serial=False)
    first_backward = time.perf_counter() - started
    forward, backward = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        out, lse = cpu.forward(call)
        forward.append(time.perf_counter() - started)
        started = time.perf_counter()
        cpu.backward(call, out, lse, out, serial=False)
        backward.append(time.perf_counter() - started)
    print(f"first forward {first_forward:.1f} s, first backward {first_backward:.1f} s; "
          f"B{B} H{H} L{L} D{D} band ±{WIDTH}: forward median {1e3 * statistics.median(forward):.1f} ms, "
          f"backward median {1e3 * statistics.median(backward):.1f} ms ({args.repeats} calls; load "
          f"{os.getloadavg()[0]:.2f})", file=sys.stdout)


if __name__ == "__main__":
    main()
