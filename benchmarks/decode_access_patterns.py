"""How the order of a float32 decode item's reads decides its speed (docs/decoding-log.md,
"Two states of the machine, and an order of reads that holds in both").

Builds ``decode_access_patterns.c`` (gcc ``-march=native``: AVX-512 or AVX2 code; OpenMP: two threads; software prefetch only in
the ``-next`` patterns) and times, call by call in a random order per round, on the bench's float32 cache (one query,
Hq 32, Hkv 8, D 128): its read patterns (the C file's comment says what each is), dotattn's
``cpu`` decode, torch SDPA's decode in its fastest form and the bench's all-core read
(``kernels/stream_read.py``).  Prints medians, GB/s of K/V, × SDPA, and per round dotattn's time
beside C's item order and the ``-next`` patterns' (the machine's state changes within a process).  Run under
``flock /tmp/bench.lock`` on a shared machine:

    PYTHONPATH=src python benchmarks/decode_access_patterns.py 8 4096 15

Needs gcc (the C is GCC vector extensions, not intrinsics: it runs on AVX2-only CPUs as well since
5 Dec 2026); the C computes no attention (it reads, and sums).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # spinning OpenMP threads would take the cores from the peers

import ctypes  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from dotattn import bench_decode as bd  # noqa: E402
from dotattn.kernels.stream_read import sum_parts  # noqa: E402

PATTERNS = {"flat": 0, "item": 1, "block16": 2, "item-trans": 3, "item-down": 4, "item-next": 5, "block16-next": 6,
            "block64-next": 7, "block128-next": 8, "scores-only": 9,
            "item-trans-next": 10, "block16-cols": 11, "item-cols": 12,
            "block16-tile4x2": 13, "block16-tile2x4": 14, "block16-tile1x8": 15,
            "block16-copy": 16, "item-copy": 17}  # the C file's enum
CHUNK = 256  # keys per item (decode_semantics.SPLIT_SIZE)


def build() -> ctypes.CDLL:
    source = Path(__file__).with_suffix(".c")
    lib = Path(tempfile.mkdtemp(prefix="dotattn-patterns-")) / "patterns.so"
    subprocess.run(["gcc", "-O3", "-march=native", "-Wno-psabi", "-fopenmp", "-shared", "-fPIC", "-o", str(lib), str(source)], check=True)
    dll = ctypes.CDLL(str(lib))
    dll.run.restype = ctypes.c_double
    dll.run.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_int]
    return dll


def main() -> None:
    B, context = int(sys.argv[1]), int(sys.argv[2])
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 15
    dll = build()
    q, kc, vc = bd.case_inputs(B, context, "float32")
    rows = np.ascontiguousarray(np.random.default_rng(0).standard_normal((4, 128)).astype(np.float32))
    nitems = kc.size // (CHUNK * 128)
    kf, vf = kc.reshape(-1), vc.reshape(-1)
    runs = {
        "dotattn": bd._make_peer("dotattn", B, context, "float32", q, kc, vc),
        "torch-sdpa": bd._make_peer("torch-sdpa", B, context, "float32", q, kc, vc),
        "all-core read": lambda: (sum_parts(kf, 2), sum_parts(vf, 2)),
    }
    for name, code in PATTERNS.items():
        runs[f"C {name}"] = lambda code=code: dll.run(kc.ctypes.data, vc.ctypes.data, rows.ctypes.data, nitems, CHUNK, code)
    for run in runs.values():
        for _ in range(3):
            run()
    times = {name: [] for name in runs}
    order = list(runs)
    load = open("/proc/loadavg").read().split()[0]
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            time.sleep(0.05)
            bd.warm_up(runs[name], 0.1)
            started = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - started)
    gb = 2 * kc.nbytes / 1e9
    sdpa = statistics.median(times["torch-sdpa"])
    print(f"B{B} {context} float32, {rounds} rounds, load {load} → {open('/proc/loadavg').read().split()[0]}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:16s} {med * 1e3:7.2f} ms  {gb / med:5.1f} GB/s  × SDPA {sdpa / med:4.2f}")
    shown = ["dotattn", "C item", "C block16", "C block16-tile4x2", "C block16-copy", "C item-copy"]
    print("  per round (ms):", " / ".join(shown))
    for row in zip(*(times[name] for name in shown)):
        print("    " + " ".join(f"{t * 1e3:5.2f}" for t in row))


if __name__ == "__main__":
    main()
