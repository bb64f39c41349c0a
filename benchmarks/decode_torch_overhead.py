"""The torch-tensor path of a SmolLM2-135M-sized decode call against the NumPy path, in one process.

B 1, Hq 9, Hkv 3, D 64, one new token per call, CONTEXT cached tokens (default 100):
``attention_with_kvcache`` on NumPy arrays and on torch tensors sharing their memory, and
``KVCache.attend`` with NumPy and with torch buffers (a two-layer cache attended at layer 0, so
its lengths do not move).  The four calls alternate in ROUNDS rounds (random order each round,
200 calls each); printed: wall median / thread CPU time per call (µs) of each, and the torch −
NumPy differences — the figure that means something on a host whose core speed changes
within minutes.  Checks first that the torch and NumPy results have the same bits.
Grad mode is off for the whole run (``torch.set_grad_enabled(False)``).

    flock /tmp/bench.lock env PYTHONPATH=src python benchmarks/decode_torch_overhead.py [CONTEXT] [ROUNDS]
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import torch

import dotattn
from dotattn import KVCache

B, Hq, Hkv, D, cap = 1, 9, 3, 64, 2048
rng = np.random.default_rng(0)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 9
kc = rng.standard_normal((B, Hkv, cap, D), dtype=np.float32)
vc = rng.standard_normal((B, Hkv, cap, D), dtype=np.float32)
q = rng.standard_normal((B, Hq, 1, D), dtype=np.float32)
kn = rng.standard_normal((B, Hkv, 1, D), dtype=np.float32)
tkc, tvc, tq, tkn = (torch.from_numpy(x) for x in (kc, vc, q, kn))
lengths = np.array([n])
tlengths = torch.tensor([n])
caches = {}
ks = [rng.standard_normal((B, Hkv, n, D), dtype=np.float32) for _ in range(2)]
for lib in ("numpy", "torch"):
    c = KVCache(B, Hkv, D, cap, num_layers=2, library=lib)
    for layer in range(2):
        k = ks[layer]
        c.append(*(torch.from_numpy(k),)*2 if lib == "torch" else (k, k), layer=layer)
    caches[lib] = c
torch.set_grad_enabled(False)
cn, ct = caches["numpy"], caches["torch"]
fns = dict(
 np=lambda: dotattn.attention_with_kvcache(q, kc, vc, kn, kn, cache_lengths=lengths),
 torch=lambda: dotattn.attention_with_kvcache(tq, tkc, tvc, tkn, tkn, cache_lengths=tlengths),
 attend_np=lambda: cn.attend(q, kn, kn, layer=0),
 attend_torch=lambda: ct.attend(tq, tkn, tkn, layer=0),
)
assert np.array_equal(fns["np"](), fns["torch"]().numpy()) and np.array_equal(fns["attend_np"](), fns["attend_torch"]().numpy())
for f in fns.values(): f(); f()
res = {k: [] for k in fns}; cpu = {k: [] for k in fns}
for r in range(rounds):
    for k in np.random.default_rng(r).permutation(list(fns)):
        f = fns[k]; ts = []
        c0 = time.thread_time()
        for _ in range(200):
            t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
        cpu[k].append((time.thread_time() - c0) / 200 * 1e6)
        res[k].append(statistics.median(ts) * 1e6)
w = {k: statistics.median(v) for k, v in res.items()}; c = {k: statistics.median(v) for k, v in cpu.items()}
print(f"{dotattn.__file__.split('/src/')[0]} n={n} " + "  ".join(f"{k} {w[k]:.1f}/{c[k]:.1f}" for k in fns)
      + f"  | gap attention_with_kvcache {w['torch']-w['np']:.1f}/{c['torch']-c['np']:.1f}  gap attend {w['attend_torch']-w['attend_np']:.1f}/{c['attend_torch']-c['attend_np']:.1f}")
