"""First-call cost of the cpu backend: compile (empty cache) vs a second process (disk cache).

Runs child processes with a private ``NUMBA_CACHE_DIR`` and ``DOTATTN_CACHE_DIR`` so the
first one compiles from scratch and the second loads from disk; then two processes with a
self-contained user ``mask_mod`` (a module-level ``def``: its kernel copy is a generated
file that Numba caches, so the second process loads it), and one with a lambda that closes
over a variable (an in-memory copy, compiled in every process).  Each child times
``import dotattn`` + one forward + one backward.

    .venv/bin/python benchmarks/cpu_first_call.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

USER_MODULE = """
def band(b, h, q_idx, kv_idx):
    return abs(q_idx - kv_idx) <= 64
"""

CHILD = r"""
import time
t0 = time.perf_counter()
import numpy as np
import dotattn
q = np.random.default_rng(0).standard_normal((1, 2, 256, 64), dtype=np.float32)
extras = {{}}
if {user!r} == "def":
    import first_call_mods
    extras["mask_mod"] = first_call_mods.band
elif {user!r} == "closure":
    width = 64
    extras["mask_mod"] = lambda b, h, i, j: abs(i - j) <= width
t1 = time.perf_counter()
out, lse = dotattn.attention(q, q, q, implementation="cpu", return_lse=True, **extras)
t2 = time.perf_counter()
dotattn.attention_backward(q, q, q, out, lse, out, implementation="cpu", **extras)
t3 = time.perf_counter()
print(f"import {{t1 - t0:.2f}} s, first forward {{t2 - t1:.2f}} s, first backward {{t3 - t2:.2f}} s")
"""


def child(cache_dir: str, user: str) -> str:
    env = dict(
        os.environ,
        NUMBA_CACHE_DIR=os.path.join(cache_dir, "numba"),
        DOTATTN_CACHE_DIR=os.path.join(cache_dir, "dotattn"),
        PYTHONPATH=os.pathsep.join([cache_dir, os.environ.get("PYTHONPATH", "")]),
    )
    result = subprocess.run(
        [sys.executable, "-c", CHILD.format(user=user)], env=env, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        with open(os.path.join(cache, "first_call_mods.py"), "w", encoding="utf-8") as f:
            f.write(USER_MODULE)
        print("empty cache (compiles):             ", child(cache, ""))
        print("second process (disk cache):        ", child(cache, ""))
        print("user def mask_mod, first process:   ", child(cache, "def"))
        print("user def mask_mod, second process:  ", child(cache, "def"))
        print("user closure mask_mod (in memory):  ", child(cache, "closure"))


if __name__ == "__main__":
    main()
