"""The float32 decode's two modes, call by call: what each thread did, and what the host took.

    flock /tmp/bench.lock .venv/bin/python benchmarks/decode_mode_probe.py [rounds=30]

Per round of 20 B8 4k float32 calls: the median call, the items the partner thread ran (of
1,024) and each thread's µs per item (by wrapping ``run_items_caller``/``run_items_partner``),
and each vCPU's steal (time the host took it away) and busy ticks from /proc/stat.  On the AMD
machine (4 Dec 2026, docs/decoding-log.md "The machine's read, round by round") both threads ran
11.5 µs an item in the fast mode and 14.5–17.8 in the slow one, with no steal in either.
"""
import time, sys, numpy as np
import dotattn
from dotattn.kernels import cpu_decode
K = cpu_decode.K
rec = {}
orig_p, orig_c = K.run_items_partner, K.run_items_caller
def partner(flags, i, gen, counter, total, role, common):
    t0 = time.perf_counter(); done = orig_p(flags, i, gen, counter, total, role, common)
    rec.setdefault(gen, {})["p"] = (t0, time.perf_counter(), done); return done
def caller(flags, gen, partners, max_cycles, counter, total, role, common):
    t0 = time.perf_counter(); ok = orig_c(flags, gen, partners, max_cycles, counter, total, role, common)
    rec.setdefault(gen, {})["c"] = (t0, time.perf_counter(), total); return ok
K.run_items_partner, K.run_items_caller = partner, caller
def stat():
    out = {}
    for line in open("/proc/stat"):
        if line.startswith("cpu") and line[3].isdigit():
            f = line.split(); v = list(map(int, f[1:]))
            out[f[0]] = (v[7], sum(v[:3]) + v[5] + v[6])  # steal, busy (user+nice+system+irq+softirq) in ticks
    return out
B, L, Hq, Hkv, D = 8, 4096, 32, 8, 128
rng = np.random.default_rng(0)
k = rng.standard_normal((B, Hkv, L, D), dtype=np.float32); v = rng.standard_normal((B, Hkv, L, D), dtype=np.float32)
q = rng.standard_normal((B, Hq, 1, D), dtype=np.float32); lens = np.full(B, L)
for _ in range(5): dotattn.attention_with_kvcache(q, k, v, cache_lengths=lens)
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 30
for r in range(rounds):
    rec.clear(); s0 = stat(); ts = []
    for _ in range(20):
        a = time.perf_counter(); dotattn.attention_with_kvcache(q, k, v, cache_lengths=lens); ts.append(time.perf_counter() - a)
    s1 = stat()
    pr = [(x["p"][2], (x["p"][1] - x["p"][0]) / max(x["p"][2], 1), (x["c"][1] - x["c"][0]) / max(x["c"][2] - x["p"][2], 1))
          for x in rec.values() if "p" in x and "c" in x]
    pi = np.median([p[0] for p in pr]); pus = np.median([p[1] for p in pr]) * 1e6; cus = np.median([p[2] for p in pr]) * 1e6
    st = {c: (s1[c][0] - s0[c][0], s1[c][1] - s0[c][1]) for c in s0}
    print(f"{r:3d} {np.median(ts)*1e3:6.2f} ms  partner items {pi:4.0f}  µs/item partner {pus:5.1f} caller {cus:5.1f}  "
          + "  ".join(f"{c}: steal {s} busy {b}" for c, (s, b) in sorted(st.items())), flush=True)
