"""Ring attention on 2 processes × 1 thread vs 1 process × 1 thread on the full sequence.

Causal self-attention, zigzag sharding, float32, B=1, H heads, L tokens, D=64, through
torch autograd: forward (``fwd``) and forward + backward (``fwd+bwd``).  Three worker
processes stay alive for the whole run — one single-process peer and the ring's ranks — and
the rounds alternate between them, so both see the same machine load; every process runs
its kernels on one thread (``NUMBA_NUM_THREADS=OMP_NUM_THREADS=1``).  The ring's ranks meet
in a gloo group on loopback (a ``FileStore`` rendezvous, no fixed port).

Reported (medians over ``--repeats`` rounds, after one warm-up round):

* time of each pass; for the ring, the slowest rank's time, all ranks starting together
  after a barrier; speedup = single / ring;
* un-hidden communication: time the ranks spend blocked in ``wait()`` on a K/V or dK/dV
  message, plus the call's agreement exchange, as a share of the ring's time (the rest of
  the transfer overlapped with compute);
* peak memory each pass needed above what the process held before it (``VmHWM − RSS``, the
  peak counter reset through ``/proc/self/clear_refs``), per rank vs the single process.
  With ``--memory`` the workers run with glibc's mmap threshold fixed at 256 KiB
  (``MALLOC_MMAP_THRESHOLD_``): every buffer past it is its own mapping, returned to the OS
  when freed, so RSS is what is alive.  With glibc's default (a threshold that grows to the
  largest freed buffer, up to 32 MiB) a freed 16 MiB shard stays in the heap, the next round
  reuses it without raising RSS, and the ranks' figures are meaningless (32 / 6 MiB for a
  forward that holds 120).  The fixed threshold costs a page fault per page of every fresh
  large allocation, which slows both sides and the ring more (idle, 30 Nov: speedup 1.57× /
  1.65× with it, 1.75× / 1.77× without): take times from a run without ``--memory``,
  peaks from a run with it.

    .venv/bin/python benchmarks/ring.py                      # L=16384, H=8, 3 rounds: times
    .venv/bin/python benchmarks/ring.py --memory --repeats 1 # the same: real per-rank peaks
    .venv/bin/python benchmarks/ring.py --L 4096 --repeats 2 --json
    .venv/bin/python benchmarks/ring.py --repeats 0                 # only the loopback bandwidth

Also measured: gloo's loopback throughput (a ``--bandwidth-mib`` message from rank 0 to rank 1
and back, median of 5), the ``BW`` of the overlap condition in ``docs/distributed.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Client, Listener


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> int:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); returns the RSS in KiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


# =================================================================================
# workers
# =================================================================================


def _inputs(args, rank=None, world=None):
    import numpy as np
    import torch

    import dotattn.distributed as dd

    rng = np.random.default_rng(0)
    shape = (1, args.H, args.L, args.D)
    q, k, v, dout = (rng.standard_normal(shape, dtype=np.float32) for _ in range(4))
    if rank is not None:
        q, k, v, dout = (np.ascontiguousarray(dd.shard(x, rank, world, "zigzag")) for x in (q, k, v, dout))
    return [torch.from_numpy(x) for x in (q, k, v, dout)]


def worker(role: str, rank: int, world: int, store: str, address: tuple, authkey: bytes, args) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    import dotattn
    import dotattn.distributed as dd

    torch.set_num_threads(1)
    conn = Client(address, authkey=authkey)
    if role == "ring":
        dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
        blocked = [0.0]
        real_wait, real_exchange = dd._wait, dd._exchange

        def timed_wait(works, what):
            t = time.perf_counter()
            try:
                return real_wait(works, what)
            finally:
                blocked[0] += time.perf_counter() - t

        def timed_exchange(*a, **kw):
            t = time.perf_counter()
            try:
                return real_exchange(*a, **kw)
            finally:
                blocked[0] += time.perf_counter() - t

        dd._wait, dd._exchange = timed_wait, timed_exchange
        q, k, v, dout = _inputs(args, rank, world)

        def call(q, k, v):
            return dd.ring_attention(q, k, v, causal=True, sharding="zigzag", implementation=args.implementation)
    else:
        q, k, v, dout = _inputs(args)

        def call(q, k, v):
            return dotattn.attention(q, k, v, causal=True, implementation=args.implementation)

    conn.send(("ready", role, rank))
    while True:
        try:
            mode = conn.recv()
        except EOFError:
            break
        if mode is None:
            break
        if mode == "bandwidth":  # rank 0 → rank 1 and back, one message each way, timed on rank 0
            conn.send(_bandwidth(args.bandwidth_mib, rank))
            continue
        qq, kk, vv = (x.detach().clone().requires_grad_(mode == "fwd+bwd") for x in (q, k, v))
        if role == "ring":
            dist.barrier()
            blocked[0] = 0.0
        before = _reset_peak()
        c0 = time.process_time()
        t0 = time.perf_counter()
        out = call(qq, kk, vv)
        if mode == "fwd+bwd":
            out.backward(dout)
        seconds = time.perf_counter() - t0
        cpu = time.process_time() - c0
        peak = _status_kib("VmHWM") - before
        finite = bool(np.isfinite(out.detach().numpy()).all())
        del out, qq, kk, vv
        conn.send(dict(seconds=seconds, cpu_s=cpu, peak_mib=peak / 1024, finite=finite,
                       blocked=blocked[0] if role == "ring" else 0.0))
    conn.close()
    if role == "ring":
        dist.destroy_process_group()


def _bandwidth(mib: int, rank: int) -> float:
    """Loopback gloo throughput in GB/s (median of 5 round trips of a ``mib`` MiB message)."""
    import torch
    import torch.distributed as dist

    buf = torch.ones(mib * 2**18, dtype=torch.float32)
    times = []
    for _ in range(5):
        dist.barrier()
        t = time.perf_counter()
        if rank == 0:
            dist.send(buf, dst=1)
            dist.recv(buf, src=1)
        elif rank == 1:
            dist.recv(buf, src=0)
            dist.send(buf, dst=0)
        times.append(time.perf_counter() - t)
    return 2 * buf.numel() * 4 / statistics.median(times) / 1e9


# =================================================================================
# the driver
# =================================================================================


def _spawn(role, rank, world, store, address, authkey_hex, args):
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", DOTATTN_BENCH_AUTHKEY=authkey_hex)
    if args.memory:
        # see the module docstring: peaks that mean something, at the price of a page fault
        # per fresh large allocation (which slows both sides, the ring more: not for timing)
        env["MALLOC_MMAP_THRESHOLD_"] = str(256 * 1024)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", role, str(rank), str(world), store,
           address[0], str(address[1]), "--L", str(args.L), "--H", str(args.H), "--D", str(args.D),
           "--bandwidth-mib", str(args.bandwidth_mib)]
    if args.implementation:
        cmd += ["--implementation", args.implementation]
    return subprocess.Popen(cmd, env=env)


def run(args) -> dict:
    world = args.world
    authkey = secrets.token_hex(16)
    listener = Listener(("127.0.0.1", 0), authkey=authkey.encode())
    tmp = tempfile.mkdtemp(prefix="dotattn-ring-bench-")
    store = os.path.join(tmp, "store")
    procs = [_spawn("single", 0, 1, store, listener.address, authkey, args)]
    procs += [_spawn("ring", r, world, store, listener.address, authkey, args) for r in range(world)]
    conns = []
    try:
        for _ in procs:
            conns.append(listener.accept())
        by_role = {}
        for c in conns:  # connections arrive in any order: each worker says who it is
            _, role, rank = c.recv()
            by_role[(role, rank)] = c
        single = [by_role[("single", 0)]]
        ring = [by_role[("ring", r)] for r in range(world)]

        def measure(group, mode):
            for c in group:
                c.send(mode)
            return [c.recv() for c in group]

        rows = {m: {"single": [], "ring": []} for m in ("fwd", "fwd+bwd")}
        for rnd in range(args.repeats + 1 if args.repeats else 0):  # round 0 warms up (kernel loading, first calls)
            for mode in ("fwd", "fwd+bwd"):
                s = measure(single, mode)
                r = measure(ring, mode)
                if rnd == 0:
                    continue
                rows[mode]["single"].append(s[0])
                rows[mode]["ring"].append(r)
                print(f"round {rnd} {mode}: single {s[0]['seconds']:.2f} s, ring "
                      f"{max(x['seconds'] for x in r):.2f} s", file=sys.stderr, flush=True)
        bandwidth = measure(ring, "bandwidth")[0] if world >= 2 else None
        for c in conns:
            c.send(None)
    finally:
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        listener.close()

    result = dict(L=args.L, H=args.H, D=args.D, world=world, repeats=args.repeats, implementation=args.implementation,
                  uptime=open("/proc/loadavg").read().split()[:3], loopback_gb_per_s=bandwidth, passes={})
    for mode, data in rows.items():
        if not data["single"]:
            continue
        single_t = statistics.median(x["seconds"] for x in data["single"])
        ring_t = statistics.median(max(x["seconds"] for x in r) for r in data["ring"])
        blocked = statistics.median(max(x["blocked"] for x in r) for r in data["ring"])
        result["passes"][mode] = dict(
            single_s=single_t,
            ring_s=ring_t,
            speedup=single_t / ring_t,
            unhidden_comm_s=blocked,
            unhidden_comm_share=blocked / ring_t,
            # CPU time / wall time of each process: below 1 means the machine's other load
            # (not our messages) kept it off the core
            single_cpu_share=statistics.median(x["cpu_s"] / x["seconds"] for x in data["single"]),
            ring_cpu_share_per_rank=[statistics.median(r[i]["cpu_s"] / r[i]["seconds"] for r in data["ring"])
                                     for i in range(world)],
            single_peak_mib=statistics.median(x["peak_mib"] for x in data["single"]),
            ring_peak_mib_per_rank=[statistics.median(r[i]["peak_mib"] for r in data["ring"]) for i in range(world)],
            all_finite=all(x["finite"] for x in data["single"]) and all(x["finite"] for r in data["ring"] for x in r),
        )
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--L", type=int, default=16384)
    parser.add_argument("--H", type=int, default=8)
    parser.add_argument("--D", type=int, default=64)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--implementation", default=None, help="local backend (default: dotattn's choice)")
    parser.add_argument("--bandwidth-mib", type=int, default=64, help="message size of the loopback bandwidth check")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--memory", action="store_true",
                        help="fix glibc's mmap threshold in the workers so that peak memory is real "
                             "(slows large allocations: read the times of such a run with care)")
    parser.add_argument("--worker", nargs=6, metavar=("ROLE", "RANK", "WORLD", "STORE", "HOST", "PORT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        role, rank, world, store, host, port = args.worker
        worker(role, int(rank), int(world), store, (host, int(port)),
               os.environ["DOTATTN_BENCH_AUTHKEY"].encode(), args)
        return
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    t0 = time.time()
    result = run(args)
    result["load_before"] = load_before
    result["wall_s"] = time.time() - t0
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"L={args.L} H={args.H} D={args.D} causal zigzag float32, {args.world} processes × 1 thread vs 1 × 1; "
          f"medians of {args.repeats}; load average before {' '.join(load_before)}, after {' '.join(result['uptime'])}")
    if result["loopback_gb_per_s"] is not None:
        print(f"gloo loopback, {args.bandwidth_mib} MiB messages: {result['loopback_gb_per_s']:.2f} GB/s")
    print("CPU time / wall time: " + "; ".join(
        f"{m}: single {p['single_cpu_share']:.2f}, ranks " + "/".join(f"{x:.2f}" for x in p["ring_cpu_share_per_rank"])
        for m, p in result["passes"].items()))
    print(f"{'pass':8} {'single s':>9} {'ring s':>8} {'speedup':>8} {'unhidden comm':>14} {'peak MiB single':>16} "
          f"{'peak MiB per rank':>18}")
    for mode, p in result["passes"].items():
        ranks = "/".join(f"{m:.0f}" for m in p["ring_peak_mib_per_rank"])
        print(f"{mode:8} {p['single_s']:9.2f} {p['ring_s']:8.2f} {p['speedup']:7.2f}× "
              f"{100 * p['unhidden_comm_share']:13.1f}% {p['single_peak_mib']:16.0f} {ranks:>18}")


if __name__ == "__main__":
    main()
