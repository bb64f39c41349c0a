"""First-call cost of the cpu backend: compile (empty cache) vs a second process (disk cache).

Runs child processes with a private ``NUMBA_CACHE_DIR`` so the first one compiles from
scratch and the second loads from disk; then a process that compiles a user ``mask_mod``
(never cached).  Each child times ``import dotattn`` + one forward + one backward.

    .venv/bin/python benchmarks/cpu_first_call.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

CHILD = r"""
import time
t0 = time.perf_counter()
import numpy as np
import dotattn
q = np.random.default_rng(0).standard_normal((1, 2, 256, 64), dtype=np.float32)
extras = {{}}
if {user}:
    extras["mask_mod"] = lambda b, h, i, j: abs(i - j) <= 64
t1 = time.perf_counter()
out, lse = dotattn.attention(q, q, q, implementation="cpu", return_lse=True, **extras)
t2 = time.perf_counter()
dotattn.attention_backward(q, q, q, out, lse, out, implementation="cpu", **extras)
t3 = time.perf_counter()
print(f"import {{t1 - t0:.2f}} s, first forward {{t2 - t1:.2f}} s, first backward {{t3 - t2:.2f}} s")
"""


def child(cache_dir: str, user: bool) -> str:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    result = subprocess.run(
        [sys.executable, "-c", CHILD.format(user=user)], env=env, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        print("empty cache (compiles):       ", child(cache, False))
        print("second process (disk cache):  ", child(cache, False))
        print("user mask_mod (compiles copy):", child(cache, True))


if __name__ == "__main__":
    main()
