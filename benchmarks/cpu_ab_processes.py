"""One backward call timed in several worker processes that differ only by their environment.

``cpu_ab_trees.py`` compares two source trees; this compares processes of one tree (or of
several, ``TREE:``) whose environment differs — a kernel cache filled by the process's own
first calls against the precompiled one, a second process loading what the first compiled,
float32's two product routes, or simply N identical processes (how far whole-call medians of
identical processes drift apart on a shared host).  Workers start one after another (a worker
whose cache is empty compiles in its warm-up, before the next starts), then every round asks
each worker for one call, in an order shuffled per round (seeded); medians, 10th/25th
percentiles, the medians of the first and second half of the rounds, and each worker's result
hash (same bits?).

    mkdir /tmp/empty
    PYTHONPATH=src .venv/bin/python benchmarks/cpu_ab_processes.py --rounds 40 \\
        pre=DOTATTN_F32_PRODUCTS:amx5 \\
        first=DOTATTN_F32_PRODUCTS:amx5,DOTATTN_PRECOMPILED_DIR:/tmp/empty \\
        reload=DOTATTN_F32_PRODUCTS:amx5,DOTATTN_PRECOMPILED_DIR:/tmp/empty \\
        pre2=DOTATTN_F32_PRODUCTS:amx5

A worker is ``name=VAR:value,VAR:value`` (``name=`` alone: this environment; ``TREE:path``
sets its ``PYTHONPATH``, default ``--tree``).  ``--case dtype,H,L,D,causal`` (B = 1): the
backward of that shape through ``dotattn.attention_backward`` (NumPy API), the forward's out
and LSE computed once.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

WORKER = r"""
import hashlib, json, resource, sys, time
import numpy as np
started = time.perf_counter()
import dotattn
from dotattn.semantics import BFLOAT16
dtype, H, L, D, causal = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
dt = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
rng = np.random.default_rng(0)
q, k, v, do = (rng.standard_normal((1, H, L, D), dtype=np.float32).astype(dt) for _ in range(4))
o, lse = dotattn.attention(q, k, v, causal=causal, return_lse=True, implementation="cpu")
def run():
    return dotattn.attention_backward(q, k, v, o, lse, do, causal=causal, implementation="cpu")
bits = hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in run())).hexdigest()[:12]
run()
print("ready " + json.dumps({"warm_up_s": round(time.perf_counter() - started, 1), "bits": bits}), flush=True)
for line in sys.stdin:
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0, c0 = time.perf_counter(), time.process_time()
    run()
    t1, c1 = time.perf_counter(), time.process_time()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps([t1 - t0, c1 - c0, r1.ru_minflt - r0.ru_minflt]), flush=True)
"""


def parse_worker(spec: str, tree: str) -> tuple[str, dict[str, str]]:
    """``name=VAR:value,…`` → (name, the worker's environment)."""
    name, _, settings = spec.partition("=")
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    for setting in filter(None, settings.split(",")):
        key, _, value = setting.partition(":")
        if key == "TREE":
            env["PYTHONPATH"] = os.path.abspath(value)
        else:
            env[key] = value
    return name, env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", default="float32,8,4096,64,0", help="dtype,H,L,D,causal (0/1)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tree", default="src")
    parser.add_argument("workers", nargs="+")
    args = parser.parse_args()
    workers = {}
    for spec in args.workers:
        name, env = parse_worker(spec, args.tree)
        p = subprocess.Popen([sys.executable, "-c", WORKER, *args.case.split(",")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        line = p.stdout.readline().strip()
        assert line.startswith("ready"), f"worker {name} failed"
        info = json.loads(line[len("ready"):])
        print(f"{name}: warm-up {info['warm_up_s']:.1f} s, bits {info['bits']}", flush=True)
        workers[name] = p
    print(f"{time.strftime('%H:%M:%S', time.gmtime())} UTC, load {os.getloadavg()[0]:.2f}", flush=True)
    wall = {w: [] for w in workers}
    cpu = {w: [] for w in workers}
    faults = {w: [] for w in workers}
    order = random.Random(1)
    for _ in range(args.rounds):
        names = list(workers)
        order.shuffle(names)
        for w in names:
            workers[w].stdin.write("x\n")
            workers[w].stdin.flush()
            t, c, f = json.loads(workers[w].stdout.readline())
            wall[w].append(t)
            cpu[w].append(c)
            faults[w].append(f)
            time.sleep(0.05)
    first = next(iter(workers))
    half = args.rounds // 2
    for w in workers:
        ts = sorted(wall[w])
        med = statistics.median(ts)
        print(f"{w}: {med * 1e3:.1f} ms (×{med / statistics.median(wall[first]):.3f}), cpu {statistics.median(cpu[w]) * 1e3:.0f} ms, "
              f"p10 {ts[len(ts) // 10] * 1e3:.1f}, p25 {ts[len(ts) // 4] * 1e3:.1f}, "
              f"halves {statistics.median(wall[w][:half]) * 1e3:.0f}/{statistics.median(wall[w][half:]) * 1e3:.0f}, "
              f"minor faults {statistics.median(faults[w]):.0f}", flush=True)
    print(f"{time.strftime('%H:%M:%S', time.gmtime())} UTC, load {os.getloadavg()[0]:.2f}")
    for p in workers.values():
        p.stdin.close()
        p.wait()


if __name__ == "__main__":
    main()
