"""First-call cost of the cpu backend in a fresh process: precompiled kernels vs compiling.

Every child process gets an empty private ``NUMBA_CACHE_DIR`` and ``DOTATTN_CACHE_DIR`` (a
fresh environment).  Rows:

* ``no precompile``: also an empty ``DOTATTN_PRECOMPILED_DIR`` — Numba compiles everything
  (what ``dotattn precompile`` pays once at install, and what a first call paid before);
* ``precompiled``: the package's kernel cache as ``make install`` leaves it (this script
  runs ``dotattn precompile`` first) — plain, causal and windowed calls, float32 and bfloat16,
  then a small call and a decode step on a float32 and a bfloat16 KV cache;
* a user ``mask_mod``: a module-level ``def`` and a ``lambda`` closing over an int, each
  in a first process (compiles its kernel copy into ``DOTATTN_CACHE_DIR``) and a second
  process sharing that directory (loads it).

Each child times ``import dotattn``, then per call kind the first forward and the first
backward.  H2 L384 D64: above the small-call rule ((Hq/Hkv)·Lq·Lk ≤ 65,536), so the general
kernels run; ``small`` is H2 L128 D64 (the one-block kernel; forward only, its backward is the
general one), ``decode`` one new token of SmolLM2-135M's shape (Hq 9, Hkv 3, D 64) over 512
cached ones (the split-KV kernels).  The shapes are small: the time is the kernels' load or
compile.

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


def make_band(width):
    return lambda b, h, q_idx, kv_idx: abs(q_idx - kv_idx) <= width
"""

CHILD = r"""
import time
t0 = time.perf_counter()
import numpy as np
import dotattn
import_s = time.perf_counter() - t0
rng = np.random.default_rng(0)
x = rng.standard_normal((1, 2, 384, 64), dtype=np.float32)
kinds = {kinds!r}
parts = [f"import {{import_s:.2f}} s"]
for kind in kinds:
    q = x
    extras = {{}}
    if kind.startswith("decode"):
        import ml_dtypes
        dtype = ml_dtypes.bfloat16 if kind.endswith("bfloat16") else np.float32
        k_cache, v_cache = (rng.standard_normal((1, 3, 1024, 64)).astype(dtype) for _ in range(2))
        k_new, v_new = (rng.standard_normal((1, 3, 1, 64)).astype(dtype) for _ in range(2))
        q1 = rng.standard_normal((1, 9, 1, 64)).astype(np.float32)
        t1 = time.perf_counter()
        dotattn.attention_with_kvcache(q1, k_cache, v_cache, k_new, v_new, cache_lengths=[512], implementation="cpu")
        parts.append(f"{{kind}}: step {{time.perf_counter() - t1:.2f}} s")
        continue
    if kind == "small":
        q = x[:, :, :128]
    elif kind == "bfloat16":
        import ml_dtypes
        q = x.astype(ml_dtypes.bfloat16)
    elif kind == "causal":
        extras["causal"] = True
    elif kind == "window":
        extras["window"] = (64, 64)
    elif kind == "def":
        import first_call_mods
        extras["mask_mod"] = first_call_mods.band
    elif kind == "lambda":
        import first_call_mods
        extras["mask_mod"] = first_call_mods.make_band(64)
    t1 = time.perf_counter()
    out, lse = dotattn.attention(q, q, q, implementation="cpu", return_lse=True, **extras)
    t2 = time.perf_counter()
    dotattn.attention_backward(q, q, q, out, lse, out, implementation="cpu", **extras)
    t3 = time.perf_counter()
    parts.append(f"{{kind}}: fwd {{t2 - t1:.2f}} s, bwd {{t3 - t2:.2f}} s")
print("; ".join(parts))
"""


def child(cache_dir: str, kinds: list[str], precompiled_dir: str | None = None) -> str:
    env = dict(
        os.environ,
        NUMBA_CACHE_DIR=os.path.join(cache_dir, "numba"),
        DOTATTN_CACHE_DIR=os.path.join(cache_dir, "dotattn"),
        PYTHONPATH=os.pathsep.join([cache_dir, os.environ.get("PYTHONPATH", "")]),
    )
    if precompiled_dir is not None:
        env["DOTATTN_PRECOMPILED_DIR"] = precompiled_dir
    result = subprocess.run(
        [sys.executable, "-c", CHILD.format(kinds=kinds)], env=env, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def main() -> None:
    subprocess.run([sys.executable, "-m", "dotattn.cli", "precompile"], check=True, capture_output=True)
    with tempfile.TemporaryDirectory() as empty, tempfile.TemporaryDirectory() as cache:
        print("no precompile (compiles):      ", child(empty, ["plain"], precompiled_dir=os.path.join(empty, "pre")))
        kinds = ["plain", "causal", "window", "bfloat16", "small", "decode float32", "decode bfloat16"]
        print("precompiled, fresh caches:     ", child(os.path.join(cache, "a"), kinds))
        with open(os.path.join(cache, "first_call_mods.py"), "w", encoding="utf-8") as f:
            f.write(USER_MODULE)
        print("user def mask_mod, 1st process:", child(cache, ["def"]))
        print("user def mask_mod, 2nd process:", child(cache, ["def"]))
        print("user lambda closure, 1st:      ", child(cache, ["lambda"]))
        print("user lambda closure, 2nd:      ", child(cache, ["lambda"]))


if __name__ == "__main__":
    main()
