"""What ``dotattn bench``'s peak-memory measurement costs the calls it measures.

dotattn's cpu backend and torch SDPA (float32, H8 L4096 D64, or H4 D128 with ``128``), each
called with no measurement, with a thread sampling the resident size every millisecond (the
bench's way until 2 Dec 2026), and with the kernel's own peak (``VmHWM`` reset through
``/proc/self/clear_refs``, the bench's way now); all six in a shuffled order per round, one
process, medians.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_memory_sampler.py [64|128] [ROUNDS]
"""

import time, statistics, random, sys, numpy as np, torch, dotattn, contextlib
import torch.nn.functional as F
from dotattn import bench
H,D=(4,128) if len(sys.argv)>1 and sys.argv[1]=="128" else (8,64)
rounds=int(sys.argv[2]) if len(sys.argv)>2 else 10
rng=np.random.default_rng(0)
q,k,v=(rng.standard_normal((1,H,4096,D),dtype=np.float32) for _ in range(3))
tq,tk,tv=(torch.from_numpy(x) for x in (q,k,v))
def ours(): return dotattn.attention(q,k,v,implementation="cpu")
def sdpa():
    with torch.no_grad(): return F.scaled_dot_product_attention(tq,tk,tv)
class Sampling(bench._PeakRss):
    def __enter__(self):
        self.base=self.peak=bench._rss_bytes(); import threading
        self._stop=threading.Event(); self._thread=threading.Thread(target=self._sample,daemon=True); self._thread.start(); return self
modes={"none":contextlib.nullcontext,"thread":Sampling,"kernel":bench._PeakRss}
T={}
keys=[(p,s) for p in ("ours","sdpa") for s in modes]
for r in range(rounds+1):
    random.shuffle(keys)
    for p,s in keys:
        time.sleep(0.2)
        with modes[s]():
            t0=time.perf_counter(); (ours if p=="ours" else sdpa)(); dt=time.perf_counter()-t0
        if r: T.setdefault((p,s),[]).append(dt*1e3)
med={k:statistics.median(v) for k,v in T.items()}
for s in modes: print(f"D{D} {s:<7} ours {med[('ours',s)]:.1f} sdpa {med[('sdpa',s)]:.1f} ×sdpa {med[('sdpa',s)]/med[('ours',s)]:.3f}")
