"""Why a bfloat16 forward is slower after a pause than back to back, and whether placing its
parallel steps on other threads helps — the three measurements behind docs/performance.md's
"bfloat16 D128 forward after a pause: not the hand-offs".

``--part wake``: how late the second thread starts a parallel step after the process idled
(each chunk does the same ≈ 0.3 ms of arithmetic), for Numba's OpenMP team (``prange``, the
forward kernel's launch) and for ``_launch.run_chunks``' pool thread (the K/V pack's).

``--part pauses``: one H4 L4096 D128 forward (NumPy API) after each kind of pause, alternated
call by call: none, a 0.2 s sleep (what ``cpu_vs_sdpa_interleaved.py`` does), 50 ms of one
core spinning in cache, 50 ms of one core sweeping 256 MiB (cold caches, awake core), and a
0.2 s sleep followed by 10 ms of spinning.

``--part placement``: the same forward with today's placement (pack on the pool thread, kernel
on the OpenMP team) alternated with (a) the kernel on the pool thread as well (one thread woken
per call, already awake for the kernel) or (b) the pack on the OpenMP team as well (rows from
a shared queue); 0.2 s pauses, same output bits checked.

``--part pin``: where the OpenMP worker runs when it wakes late (``sched_getcpu``), and the same
forward with the worker left free alternated call by call with the worker pinned to one CPU
(``os.sched_setaffinity`` on its thread id; the caller stays free); 0.2 s pauses.

    flock /tmp/bench.lock .venv/bin/python benchmarks/bf16_forward_after_idle.py --part wake|pauses|placement|pin [--rounds 21] [--H 4 --D 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))


def wake(rounds: int) -> None:
    from numba import njit, prange

    from dotattn.kernels import _launch
    from dotattn.kernels._cpu_sync import _cycles

    @njit(nogil=True)
    def pool_chunk(stamps, work, sink, c, n):  # one thread's part: stamps, ≈ 300 µs of sqrt, stamps
        stamps[c] = _cycles()
        s = 0.0
        for i in range(work):
            s += np.sqrt(i + c)
        sink[c] = s
        stamps[2 + c] = _cycles()

    @njit(parallel=True, nogil=True)
    def team_step(stamps, work, sink):
        for c in prange(2):
            pool_chunk(stamps, work, sink, c, 2)

    @njit
    def now():
        return _cycles()

    stamps, sink = np.zeros(4, dtype=np.int64), np.zeros(2)
    team_step(stamps, 10, sink), now(), _launch.run_chunks(pool_chunk, (stamps, 10, sink), 2)
    t0, c0 = time.perf_counter(), now()
    time.sleep(0.5)
    per_us = (now() - c0) / (time.perf_counter() - t0) / 1e6  # time-stamp counts per µs
    print(f"{time.strftime('%H:%M', time.gmtime())} UTC, load {os.getloadavg()[0]:.2f}; medians of {rounds}")
    for pause in (0.0, 0.001, 0.01, 0.05, 0.2):
        rows = {"OpenMP team": [], "pool thread": []}
        for _ in range(rounds):
            for name in rows:
                time.sleep(pause)
                c = now()
                if name == "OpenMP team":
                    team_step(stamps, 200_000, sink)
                else:
                    _launch.run_chunks(pool_chunk, (stamps, 200_000, sink), 2)
                e = now()
                rows[name].append([(stamps[1] - c) / per_us, (stamps[0] - c) / per_us, (e - c) / per_us])
        for name, r in rows.items():
            second, caller, wall = (statistics.median(x[i] for x in r) for i in range(3))
            print(f"pause {pause * 1e3:5.0f} ms  {name:11s}  second thread starts +{second:6.0f} µs, "
                  f"caller +{caller:4.0f} µs, step {wall:6.0f} µs (≈ 300 µs of work per thread)")


def _inputs(H: int, D: int):
    from ml_dtypes import bfloat16

    rng = np.random.default_rng(0)
    return [rng.standard_normal((1, H, 4096, D)).astype(bfloat16) for _ in range(3)]


def pauses(rounds: int, H: int, D: int) -> None:
    import dotattn

    q, k, v = _inputs(H, D)
    big, small = np.ones((256 << 20) // 8), np.ones(1 << 14)

    def busy(seconds, data):
        t = time.perf_counter()
        while time.perf_counter() - t < seconds:
            data.sum()

    modes = {
        "back to back": lambda: None,
        "sleep 0.2 s": lambda: time.sleep(0.2),
        "one core spins 50 ms (in cache)": lambda: busy(0.05, small),
        "one core sweeps 256 MiB for 50 ms": lambda: busy(0.05, big),
        "sleep 0.2 s, then spin 10 ms": lambda: (time.sleep(0.2), busy(0.01, small)),
    }
    for _ in range(3):
        dotattn.attention(q, k, v)
    times = {m: [] for m in modes}
    for _ in range(rounds):
        for m, before in modes.items():
            before()
            t = time.perf_counter()
            dotattn.attention(q, k, v)
            times[m].append((time.perf_counter() - t) * 1e3)
    print(f"bfloat16 forward H{H} L4096 D{D}, {time.strftime('%H:%M', time.gmtime())} UTC, "
          f"load {os.getloadavg()[0]:.2f}, medians of {rounds} (modes alternated call by call)")
    for m, t in times.items():
        print(f"  {m:36s} {statistics.median(t):6.2f} ms")


def placement(rounds: int, H: int, D: int) -> None:
    from numba import njit, prange

    import dotattn
    from dotattn.kernels import _cpu_kernels, _launch, cpu
    from dotattn.kernels._cpu_amx import pack_vt
    from dotattn.kernels._cpu_primitives import _take_task

    @njit(nogil=True)
    def forward_tasks(queue, q, kp, vp, out, lse, o, chunk, nchunks):
        _cpu_kernels._forward_chunk(queue, q, kp, vp, out, lse, o)

    team_forward = _cpu_kernels.forward

    class PoolForward:  # the kernel's tasks on run_chunks (``_kernel_launch`` reads .overloads)
        overloads = team_forward.overloads

        def __call__(self, q, kp, vp, out, lse, o, nchunks):
            _launch.run_chunks(forward_tasks, (np.zeros(1, dtype=np.int64), q, kp, vp, out, lse, o), nchunks)

    @njit(parallel=True, nogil=True)
    def pack_on_team(k_rows, kp_rows, copy_k, v32, vp32, finite, nchunks):
        queue = np.zeros(1, dtype=np.int64)
        for _ in prange(nchunks):
            while True:
                r = _take_task(queue)
                if r >= v32.shape[0]:
                    break
                if copy_k:
                    kp_rows[r, :] = k_rows[r, :]
                finite[r] = pack_vt(v32[r : r + 1], vp32[r : r + 1])

    pool_pack = cpu._pack_bf16_forward_kv

    def team_pack(k, v, kv_lengths, BK, keep=False):  # cpu._pack_bf16_forward_kv on the team
        if not (cpu._whole_bf16_tiles(k, kv_lengths, BK) and cpu._whole_bf16_tiles(v, kv_lengths, BK)):
            return None
        B, Hh, L, X = v.shape
        Dk, nkb, rows = k.shape[3], L // BK, B * Hh
        kp = k if k.ctypes.data % 64 == 0 and k.flags.writeable else cpu._buffer(cpu._KV_ROLES[0] if keep else None, k.shape, cpu.BFLOAT16)
        vp = cpu._buffer(cpu._KV_ROLES[1] if keep else None, (B, Hh, nkb, X, BK), cpu.BFLOAT16)
        finite = np.zeros(rows, dtype=np.bool_)
        pack_on_team(k.view(np.uint16).reshape(rows, L * Dk), kp.view(np.uint16).reshape(rows, L * Dk), kp is not k,
                     v.view(np.uint16).view(np.uint32).reshape(rows, 1, L, X // 2),
                     vp.view(np.uint16).view(np.uint32).reshape(rows, 1, nkb, X, BK // 2), finite, cpu._num_threads())
        return kp.reshape(B, Hh, nkb, BK, Dk), vp.swapaxes(3, 4), bool(finite.all())

    def use(kernel, pack):
        _cpu_kernels.forward, cpu._pack_bf16_forward_kv = kernel, pack

    q, k, v = _inputs(H, D)
    placements = {"today": (team_forward, pool_pack), "kernel on pool": (PoolForward(), pool_pack),
                  "pack on team": (team_forward, team_pack)}
    use(*placements["today"])
    reference = dotattn.attention(q, k, v).view(np.uint16)
    for name, p in placements.items():
        use(*p)
        same = np.array_equal(dotattn.attention(q, k, v).view(np.uint16), reference)
        print(f"{name}: same bits as today's placement: {same}")
    times = {n: [] for n in placements}
    try:
        for r in range(rounds):
            order = list(placements) if r % 2 == 0 else list(placements)[::-1]
            for name in order:
                use(*placements[name])
                time.sleep(0.2)
                t = time.perf_counter()
                dotattn.attention(q, k, v)
                times[name].append((time.perf_counter() - t) * 1e3)
    finally:
        use(*placements["today"])
    today = statistics.median(times["today"])
    print(f"bfloat16 forward H{H} L4096 D{D}, 0.2 s pauses, {time.strftime('%H:%M', time.gmtime())} UTC, "
          f"load {os.getloadavg()[0]:.2f}, medians of {rounds}")
    for name, t in times.items():
        print(f"  {name:15s} {statistics.median(t):6.2f} ms  ×{statistics.median(t) / today:.3f} of today's")


def pin(rounds: int, H: int, D: int) -> None:
    import ctypes

    from numba import get_thread_id, njit, prange

    import dotattn
    from dotattn.kernels._cpu_sync import _cycles

    libc = ctypes.CDLL(None)
    getcpu, gettid = libc.sched_getcpu, libc.gettid
    getcpu.restype = gettid.restype = ctypes.c_int
    getcpu.argtypes = gettid.argtypes = ()

    @njit(parallel=True, nogil=True)
    def team_tids(tids):
        for _ in prange(2):  # long enough that both threads of the team take an iteration
            s = 0.0
            for i in range(2_000_000):
                s += np.sqrt(i)
            tids[get_thread_id()] = gettid() if s > 0 else 0

    @njit(parallel=True, nogil=True)
    def team_step(stamps, cpus, sink):
        for c in prange(2):
            stamps[c], cpus[c] = _cycles(), getcpu()
            s = 0.0
            for i in range(200_000):
                s += np.sqrt(i + c)
            sink[c] = s

    @njit
    def now():
        return _cycles()

    tids = np.zeros(2, dtype=np.int64)
    team_tids(tids)
    workers = [int(t) for t in tids if t != gettid()]
    allowed = os.sched_getaffinity(0)
    pinned = {sorted(allowed)[0]}

    def place(pin_it: bool) -> None:
        for t in workers:
            os.sched_setaffinity(t, pinned if pin_it else allowed)

    stamps, cpus, sink = np.zeros(2, dtype=np.int64), np.zeros(2, dtype=np.int64), np.zeros(2)
    team_step(stamps, cpus, sink)
    t0, c0 = time.perf_counter(), now()
    time.sleep(0.3)
    per_us = (now() - c0) / (time.perf_counter() - t0) / 1e6
    print(f"{time.strftime('%H:%M', time.gmtime())} UTC, load {os.getloadavg()[0]:.2f}; OpenMP worker threads {workers}; medians of {rounds}")
    try:
        for pause in (0.0, 0.05, 0.2):
            for pin_it in (False, True):
                place(pin_it)
                starts, shared = [], 0
                for _ in range(rounds):
                    time.sleep(pause)
                    c = now()
                    team_step(stamps, cpus, sink)
                    starts.append((stamps[1] - c) / per_us)
                    shared += int(cpus[1] == cpus[0])
                print(f"pause {pause * 1e3:4.0f} ms, worker {'pinned to CPU ' + str(min(pinned)) if pin_it else 'free':16s}: "
                      f"starts +{statistics.median(starts):6.0f} µs, on the caller's CPU in {shared} of {rounds} steps")
        q, k, v = _inputs(H, D)
        reference = dotattn.attention(q, k, v).view(np.uint16)
        times = {"free": [], "pinned": []}
        for r in range(rounds):
            for name in (("free", "pinned") if r % 2 == 0 else ("pinned", "free")):
                place(name == "pinned")
                time.sleep(0.2)
                t = time.perf_counter()
                out = dotattn.attention(q, k, v)
                times[name].append((time.perf_counter() - t) * 1e3)
                assert np.array_equal(out.view(np.uint16), reference)
    finally:
        place(False)
    free = statistics.median(times["free"])
    print(f"bfloat16 forward H{H} L4096 D{D}, 0.2 s pauses, alternated, same bits: worker free {free:.2f} ms, "
          f"pinned {statistics.median(times['pinned']):.2f} ms (×{statistics.median(times['pinned']) / free:.3f})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("wake", "pauses", "placement", "pin"), required=True)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--D", type=int, default=128)
    args = ap.parse_args()
    if args.part == "wake":
        wake(args.rounds)
    elif args.part == "pauses":
        pauses(args.rounds, args.H, args.D)
    elif args.part == "placement":
        placement(args.rounds, args.H, args.D)
    else:
        pin(args.rounds, args.H, args.D)


if __name__ == "__main__":
    main()
