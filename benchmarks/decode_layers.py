"""Decode calls as a model makes them: one call per layer, each on its own layer's cache.

``dotattn bench --shapes decode`` and ``decode_ab.py`` repeat one call on one cache, so a cache
that fits the cores' L2s (2 MiB a core on the Intel Xeon of 5 Dec 2026) is read from L2 on every
call after the first.  A model's decode step calls attention once per layer, each on its own
cache, with the layer's projections between: by the time a layer comes round again its K/V has
left the L2.  Here a *step* is one call per layer over ``--layers`` caches, optionally with a
matrix-vector product before each call over the layer's own float32 weights of ``--weights-mb``
MiB (NumPy's product, or torch's with ``--torch-weights``: a torch model's projections, whose
OpenMP workers spin between the calls).  The same steps are timed without attention; the
attention's time per call is the difference over the layers (so it includes what a call costs
the products around it).  dotattn (``attention_with_kvcache``, the ``cpu`` backend) against torch
SDPA in its fastest decode form (the query-head group folded into query rows), rounds in a
random order, medians.  Each timed step follows an untimed one of the same peer: torch's OpenMP
workers spin for a few ms after its calls, and on a 2-core machine a step of dotattn right after
SDPA's had the spinning worker on its partner's core (1.5× its time at 256 tokens).
``--repeat`` also times the bench's pattern (one cache, called back to back).  Under ``flock
/tmp/bench.lock`` on a shared machine:

    PYTHONPATH=src python benchmarks/decode_layers.py float32 64,256,1024,4096 [--layers=30 --rounds=11
        --shape=32,8,128 --weights-mb=3 --torch-weights --repeat]

(SmolLM2-135M: ``--shape=9,3,64``; its layers' weights are ≈ 3 MiB each as float32.)
"""

from __future__ import annotations

import random
import statistics
import sys
import time

import numpy as np


def _opt(name: str, default: str) -> str:
    for a in sys.argv:
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return default


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 2:
        print(__doc__)
        raise SystemExit(2)
    import torch
    import torch.nn.functional as F

    import dotattn
    from dotattn.semantics import BFLOAT16

    dtype, contexts = args[0], [int(x) for x in args[1].split(",")]
    hq, hkv, d = (int(x) for x in _opt("shape", "32,8,128").split(","))
    layers, rounds = int(_opt("layers", "30")), int(_opt("rounds", "15"))
    weights_mb = float(_opt("weights-mb", "0"))
    repeat = "--repeat" in sys.argv
    np_dtype = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    t_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    rng = np.random.default_rng(0)
    # each layer's weights: a (rows, 1024) float32 matrix of weights_mb MiB, times a vector
    wrows = int(weights_mb * (1 << 20) / 4 / 1024)
    weights = [rng.standard_normal((wrows, 1024)).astype(np.float32) for _ in range(layers)] if wrows else []
    x = rng.standard_normal(1024).astype(np.float32)
    if "--torch-weights" in sys.argv:  # the products in torch (a torch model's projections)
        weights, x = [torch.from_numpy(w) for w in weights], torch.from_numpy(x)
    print(f"{dtype} Hq {hq} Hkv {hkv} D {d}, {layers} layers, weights {weights_mb} MiB a layer"
          f"{' (torch)' if '--torch-weights' in sys.argv else ''}, {rounds} rounds, "
          f"torch {torch.__version__} threads {torch.get_num_threads()}, load {open('/proc/loadavg').read().split()[0]}")
    print(f"{'context':>8} {'K/V a layer':>12} {'dotattn µs':>11} {'SDPA µs':>9} {'× SDPA':>7}"
          + (f" {'repeated: dotattn':>18} {'SDPA':>6} {'×':>5}" if repeat else ""))
    for context in contexts:
        q = rng.standard_normal((1, hq, 1, d)).astype(np.float32).astype(np_dtype)
        caches = [(rng.standard_normal((1, hkv, context, d)).astype(np.float32).astype(np_dtype),
                   rng.standard_normal((1, hkv, context, d)).astype(np.float32).astype(np_dtype)) for _ in range(layers)]
        lengths = np.full(1, context, dtype=np.int64)
        tq = torch.from_numpy(q.view(np.uint16)).view(t_dtype) if dtype == "bfloat16" else torch.from_numpy(q)
        tq = tq.view(1, hkv, hq // hkv, d)
        tcaches = [tuple((torch.from_numpy(a.view(np.uint16)).view(t_dtype) if dtype == "bfloat16" else torch.from_numpy(a))
                         for a in pair) for pair in caches]

        def ours(i):
            k, v = caches[i]
            return dotattn.attention_with_kvcache(q, k, v, cache_lengths=lengths, implementation="cpu")

        def sdpa(i):
            k, v = tcaches[i]
            with torch.no_grad():
                return F.scaled_dot_product_attention(tq, k, v)

        def none(i):
            return None

        def step(call):
            for timed in (False, True):  # the first pass untimed: the other peer's threads settle
                t = time.perf_counter()
                for i in range(layers):
                    if wrows:
                        weights[i] @ x
                    call(i)
            return (time.perf_counter() - t) / layers

        def repeated(call):
            for timed in (False, True):
                t = time.perf_counter()
                for _ in range(layers):
                    call(0)
            return (time.perf_counter() - t) / layers

        runs = {"ours": lambda: step(ours), "sdpa": lambda: step(sdpa), "none": lambda: step(none)}
        if repeat:
            runs |= {"ours-rep": lambda: repeated(ours), "sdpa-rep": lambda: repeated(sdpa)}
        a = ours(0)
        b = sdpa(0).float().numpy()
        assert np.allclose(np.asarray(a, dtype=np.float32).reshape(b.shape), b, atol=5e-2), "dotattn and SDPA disagree"
        for run in runs.values():
            run()
        times = {name: [] for name in runs}
        order = list(runs)
        for _ in range(rounds):
            random.shuffle(order)
            for name in order:
                times[name].append(runs[name]())
        med = {name: statistics.median(t) * 1e6 for name, t in times.items()}
        o, s = med["ours"] - med["none"], med["sdpa"] - med["none"]
        kv = 2 * hkv * context * d * np.dtype(np_dtype).itemsize
        ratio = s / o if o > 0 else float("nan")  # (a product's noise can outweigh a tiny call)
        line = f"{context:>8} {kv / 2**20:>9.2f} MiB {o:>11.1f} {s:>9.1f} {ratio:>7.2f}"
        if repeat:
            line += f" {med['ours-rep']:>18.1f} {med['sdpa-rep']:>6.1f} {med['sdpa-rep'] / med['ours-rep']:>5.2f}"
        print(line + f"   (steps without attention {med['none']:.1f} µs a layer)", flush=True)


if __name__ == "__main__":
    main()
