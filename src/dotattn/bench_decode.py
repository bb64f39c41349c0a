"""``dotattn bench --shapes decode``: KV-cache decoding against the machine's read bandwidth.

One query token per sequence attends to a cache of ``context`` tokens (GQA: Hq = 32 query
heads over Hkv = 8 K/V heads, D = 128), for B ∈ {1, 8}, contexts 4k and 32k and float32,
float16 and bfloat16 caches.  A decode step is memory-bound: the figure of merit is the K/V
bytes actually read per second, ``2 · B · Hkv · context · D · itemsize / time`` (GB = 10⁹
bytes), and its share of the machine's read bandwidth measured in the same run (a NumPy sum
over a buffer of at least 512 MiB and at least four times the CPU caches the system reports —
:func:`probe_bytes`; the median of runs before and after the cases).

The issue's yardstick is that one-thread read.  Both cores together read more than one does
(a decode kernel on both cores passes 100 % of it), so the run also measures the **all-core
read** (:mod:`dotattn.kernels.stream_read`: each core sums its own part of the buffer, by
the faster of two loops — the fastest plain read we have; NumPy's sum per core read 15–25 %
less) and
prints, per case, the **bound on × sdpa**: torch's time over the time it takes just to read
the K/V bytes at the all-core read.  A kernel that reads every K/V byte once cannot beat torch
by much more than that bound, whatever it computes (a cleverer read than this loop could).

Peers, each on the same cache in the same process:

* ``dotattn``        — :func:`dotattn.attention_with_kvcache` on a contiguous cache;
* ``dotattn-paged``  — the same on a paged cache (pages of 256 tokens, shuffled);
* ``torch-sdpa``     — ``torch.nn.functional.scaled_dot_product_attention`` in its fastest
  decode form: the query-head group folded into query rows, ``q.view(B, Hkv, Hq/Hkv, D)``,
  same dtype as the cache (``enable_gqa=True`` is 3–4× slower here);
* ``dotattn-numpy``  — the NumPy split-KV implementation (not run unless asked).

Every peer's first call in a case is checked against the first peer's output (the same keys
visible, the same scale, the same query-head → K/V-head mapping; :data:`OUTPUT_TOLERANCE`):
a peer that computes other attention says ``n/a`` and why, and is not timed.

The table shows medians of ``--repeats`` timed calls, one per round: a round times every peer
once, in a shuffled order (peers interleaved, so that all of them sample the same stretch of a
shared machine's time: :mod:`.bench_common`), each timed call after the peer's warm-up —
calls, back to back, for at least :data:`WARMUP_S`, and before its first round
:data:`SETTLE_CALLS` calls, which take a size class's pool-or-alone exploration out of the timed
calls; ``× sdpa`` is torch's median time over ours.
(After the pause between peers the first two-thread calls of either library are slow — a
core that idled wakes; torch's first SDPA calls took 2–10× their time — and dotattn's pool-or-
alone choice, timed on a few such calls, ran the next 64–96 on one thread: one warm-up call
left the B1 4k rows timing that, 1.2 against 0.76 ms, 1 Dec 2026.)  The machine's load (``/proc/loadavg``) is printed before and after.

A row whose timed calls lost more than :data:`STEAL_NOTE_SHARE` of the cores' time to the
hypervisor says so too (``host steal N ms``; ``Row.steal_ms``): on this virtual machine the
B8 32k paged rows' slow calls (88–98 against 62 ms) were the host taking both vCPUs — 50–70 ms
of steal in each, the threads' own run time normal (1 Dec 2026, docs/decoding.md).

A dotattn row whose timed calls the pool-or-alone choice ran on one thread says so in its note
(``k/n calls alone``; ``Row.alone_calls`` in ``--json``): such a row is one core's speed — a
busy machine, or a class sent alone by a moment of one (the choice is kept per size class, and
the B8 32k float16 and bfloat16 rows, contiguous and paged, share one: the B8 32k bfloat16 row
ran alone at 110.8 against 59–64 ms on the pool after the float16 paged row's calls had met
another program, 1 Dec 2026; docs/decoding-log.md "The decode bench's one-thread rows").
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .bench_common import PAUSE_S, add_case_rows, fill_ratios, progress_steps, rounds_of, table_console

PEERS = ("dotattn", "dotattn-paged", "torch-sdpa", "dotattn-numpy")
DEFAULT_PEERS = ("dotattn", "dotattn-paged", "torch-sdpa")
DTYPES = ("float32", "float16", "bfloat16")
HQ, HKV, D = 32, 8, 128
PAGE = 256
BANDWIDTH_BYTES = 512 << 20  # the read-bandwidth buffer's least size (probe_bytes)
# ... and its least multiple of the CPU caches' total: STREAM's rule for arrays that come from
# memory.  512 MiB alone was not enough where a VM reports a 480 MiB L3 (the Intel host of 2 Dec):
# there the two-thread read of 512 MiB gave 25–30 GB/s where 1–2 GiB gave 19–23
# (docs/decoding-log.md, "Decode on the new host"): a yardstick partly read from the L3.
CACHE_MULTIPLE = 4
WARMUP_S = 0.25  # each peer's calls, back to back, before its timed ones (at least 3)
# each peer's calls, back to back, once before its first round: a size class's first four calls
# explore the pool-or-alone choice (pool, pool, alone, alone; cpu_decode.ParallelChoice) — once
# per process in a decode loop, but a 130 ms B8 32k call's 0.25 s warm-up is 3 calls, so the
# first row of each class timed its fourth, alone (138.9 against 65–91 ms; B1 4k 3.6–5.2 against
# 0.9–1.9 ms; 2 Dec 2026, docs/decoding-log.md "The decode bench's first row of a size class")
SETTLE_CALLS = 5


@dataclass
class Row:
    case: str
    peer: str
    B: int
    context: int
    dtype: str
    status: str = "ok"
    reason: str = ""
    ms: float | None = None
    times_ms: list[float] = field(default_factory=list)
    gbps: float | None = None
    share_of_bandwidth: float | None = None
    share_of_all_cores: float | None = None
    ratio_vs_sdpa: float | None = None
    # torch rows only: torch's time over the time of reading the K/V bytes at the all-core read
    # — the most any kernel reading every byte once can gain on torch
    sdpa_bound: float | None = None
    kv_bytes: int = 0
    # dotattn rows: how many of the timed calls ran on the calling thread alone (the pool-or-
    # alone choice, kernels/cpu_decode.ParallelChoice); None where the peer has no such choice
    alone_calls: int | None = None
    # the hypervisor's steal time during the timed calls (all CPUs, ms; Linux's /proc/stat), None
    # where unknown: a virtual machine's cores taken by the host stop both threads mid-call
    steal_ms: float | None = None


STEAL_NOTE_SHARE = 0.05  # a row notes the host's steal time past this share of its timed calls' CPU time


def steal_ms() -> float | None:
    """The CPUs' steal time so far (ms, all CPUs): time a virtual machine's vCPU was runnable
    but the host ran something else — invisible to the load average and to the guest's own
    counters of busy and idle.  None where ``/proc/stat`` does not say."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()  # "cpu user nice system idle iowait irq softirq steal …"
        return int(fields[8]) * 1000.0 / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, AttributeError):
        return None


def load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def cpu_cache_bytes() -> int:
    """The CPU caches' total size, each cache counted once (Linux's sysfs: every data or
    unified cache of every level, shared ones once); 0 where the system does not say."""
    import glob

    seen, total = set(), 0
    for index in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cache/index[0-9]*"):
        try:
            with open(f"{index}/type") as f:
                kind = f.read().strip()
            if kind == "Instruction":
                continue
            with open(f"{index}/level") as f:
                level = f.read().strip()
            with open(f"{index}/shared_cpu_list") as f:
                shared = f.read().strip()
            with open(f"{index}/size") as f:
                size = f.read().strip()
        except OSError:
            continue
        key = (level, kind, shared)
        if key in seen:
            continue
        seen.add(key)
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:].upper(), 1)
        try:
            total += int(size.rstrip("KkMmGg")) * scale
        except ValueError:
            continue
    return total


def probe_bytes() -> int:
    """The read-bandwidth buffer's size: :data:`BANDWIDTH_BYTES`, or :data:`CACHE_MULTIPLE`
    times the CPU caches (:func:`cpu_cache_bytes`) where that is more, so that no part of the
    read comes from a cache (a whole number of MiB)."""
    need = max(BANDWIDTH_BYTES, CACHE_MULTIPLE * cpu_cache_bytes())
    return -(-need // (1 << 20)) << 20


def read_bandwidth(repeats: int = 5, nbytes: int | None = None, threads: int = 1) -> list[float]:
    """GB/s (10⁹ bytes a second) of reading a buffer of ``nbytes`` (default :func:`probe_bytes`:
    at least 512 MiB and four times the CPU caches) — one value per run.

    ``threads == 1``: ``numpy.sum`` on this thread (the issue's yardstick).  ``threads > 1``:
    the all-core read — each of ``threads`` Numba threads summing its own part, by each loop
    of :data:`dotattn.kernels.stream_read.READ_LOOPS` in turn, a run's value the faster loop's:
    the fastest plain read we have (NumPy's sum in one Python thread per core read 15–25 %
    less on the AMD Zen 5, the sixteen-lane loop a third less than the vectorized one on the
    AVX2 Zen 3: a bound computed from a slow read was no bound; docs/decoding-log.md, "The
    all-core read" and "The all-core read on AVX2").
    """
    if nbytes is None:
        nbytes = probe_bytes()
    buf = np.ones(nbytes // 4, dtype=np.float32)
    if threads == 1:
        reads = [buf.sum]
    else:
        import numba

        from .kernels.stream_read import READ_LOOPS

        parts = max(1, min(threads, numba.get_num_threads()))
        reads = [lambda loop=loop: loop(buf, parts) for loop in READ_LOOPS]

    for read in reads:
        read()  # compiles or loads the loop; touches the buffer's pages
    out = []
    for _ in range(repeats):
        best = float("inf")
        for read in reads:
            t0 = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - t0)
        out.append(buf.nbytes / best / 1e9)
    return out


def cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _np_dtype(name: str):
    from .semantics import BFLOAT16

    return BFLOAT16 if name == "bfloat16" else np.dtype(name)


def case_inputs(B: int, context: int, dtype: str, seed: int = 0):
    """``(q, k_cache, v_cache)`` of a case: standard-normal, full caches, in ``dtype``."""
    rng = np.random.default_rng(seed)
    dt = _np_dtype(dtype)
    kc = rng.standard_normal((B, HKV, context, D), dtype=np.float32).astype(dt)
    vc = rng.standard_normal((B, HKV, context, D), dtype=np.float32).astype(dt)
    q = rng.standard_normal((B, HQ, 1, D), dtype=np.float32).astype(dt)
    return q, kc, vc


def _make_peer(peer: str, B: int, context: int, dtype: str, q, kc, vc):
    """A zero-argument callable running one decode step, or raise RuntimeError with the reason."""
    import dotattn

    lengths = np.full(B, context, dtype=np.int64)
    if peer in ("dotattn", "dotattn-numpy"):
        impl = "cpu" if peer == "dotattn" else "numpy"
        return lambda: dotattn.attention_with_kvcache(q, kc, vc, cache_lengths=lengths, implementation=impl)
    if peer == "dotattn-paged":
        rng = np.random.default_rng(1)
        per_seq = -(-context // PAGE)
        table = rng.permutation(B * per_seq).reshape(B, per_seq)
        pages_k = np.empty((B * per_seq, HKV, PAGE, D), dtype=kc.dtype)
        pages_v = np.empty_like(pages_k)
        for b in range(B):
            for i in range(per_seq):
                n = min(PAGE, context - i * PAGE)  # the last page may be partly used
                pages_k[table[b, i], :, :n] = kc[b, :, i * PAGE : i * PAGE + n]
                pages_v[table[b, i], :, :n] = vc[b, :, i * PAGE : i * PAGE + n]
        return lambda: dotattn.attention_with_kvcache(
            q, pages_k, pages_v, cache_lengths=lengths, block_table=table, implementation="cpu"
        )
    if peer == "torch-sdpa":
        try:
            import torch
            import torch.nn.functional as F
        except ImportError as exc:
            raise RuntimeError(f"torch not importable: {exc}") from None
        from .torch._convert import from_numpy

        tq, tk, tv = (from_numpy(np.ascontiguousarray(x)) for x in (q, kc, vc))
        tq = tq.view(B, HKV, HQ // HKV, D)  # the query-head group folded into query rows

        def run():
            with torch.no_grad():
                return F.scaled_dot_product_attention(tq, tk, tv)

        return run
    raise RuntimeError(f"unknown peer {peer!r}")


# A peer's output against the first peer's, as a share of the largest |value| of the first's:
# rounding stays far below it (torch SDPA against dotattn at 4k and 32k keys: float32 ≈ 1e-6,
# float16 ≈ 6e-4, bfloat16 ≈ 7e-3), a peer computing other attention — other keys, another
# scale, another mapping of query heads to K/V heads — is off by about 1 or more.
OUTPUT_TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}


def _output_rows(out, B: int):
    """A peer's output as float32 ``(B, Hq, D)``: dotattn's ``(B, Hq, 1, D)`` and torch's
    folded ``(B, Hkv, Hq/Hkv, D)`` both hold query head ``h = kv · Hq/Hkv + g`` at row ``h``
    (dotattn's GQA: head ``h`` reads K/V head ``h // (Hq/Hkv)``).  None for a call that
    returns nothing (the tests' stand-in peers)."""
    if out is None:
        return None
    if hasattr(out, "detach"):  # a torch tensor
        out = out.detach().float().numpy()
    return np.asarray(out, dtype=np.float32).reshape(B, HQ, D)


def _output_mismatch(reference, out, B: int, dtype: str) -> str | None:
    """Why ``out`` (a peer's call's return) is not the attention ``reference`` holds
    (``(peer, rows)``), or None where it agrees (or ``out`` is None: nothing to compare)."""
    ref_peer, ref = reference
    try:
        rows = _output_rows(out, B)
    except ValueError:
        return f"its output, of shape {getattr(out, 'shape', '?')}, is not {ref_peer}'s ({B}, {HQ}, {D}) rows"
    if rows is None:
        return None
    scale = max(float(np.abs(ref).max()), 1e-30)
    err = float(np.abs(rows - ref).max())
    tol = OUTPUT_TOLERANCE.get(dtype, 3e-2)
    if not err <= tol * scale:  # (NaN fails too)
        return f"output differs from {ref_peer}'s: max |Δ| {err:.3g} against max |out| {scale:.3g} (tolerance {tol:g})"
    return None


def _mode_counts(peer: str):
    """(alone, pool) calls of the cpu decode kernel so far, for the dotattn rows; else None."""
    if peer not in ("dotattn", "dotattn-paged"):
        return None
    from .kernels import cpu_decode

    return cpu_decode.mode_counts()


def warm_up(run, seconds: float, min_calls: int = 3) -> int:
    """Call ``run`` back to back for ``seconds`` (and at least ``min_calls`` times); returns the
    number of calls."""
    end = time.perf_counter() + seconds
    calls = 0
    while calls < min_calls or time.perf_counter() < end:
        run()
        calls += 1
    return calls


def _case_name(B: int, context: int, dtype: str) -> str:
    size = f"{context // 1024}k" if context % 1024 == 0 else str(context)
    return f"B{B}-ctx{size}-{dtype}"


class _Peer:
    """One peer's calls in a case: its row, its call, and what its timed calls saw so far."""

    def __init__(self, peer: str, B: int, context: int, dtype: str, inputs, warmup_s: float):
        self.row = Row(_case_name(B, context, dtype), peer, B, context, dtype)
        self.warmup_s = warmup_s
        self.run = _make_peer(peer, B, context, dtype, *inputs)  # RuntimeError: the row is n/a
        self.alone = 0 if _mode_counts(peer) is not None else None
        self.steal = 0.0

    def time_once(self) -> None:
        """One round's turn: a pause, calls back to back for ``warmup_s`` (so the timed call is
        a warm one, as a decode loop's calls are), then one timed call, with the kernel's
        alone-or-pool count and the host's steal time around it."""
        time.sleep(PAUSE_S)  # the previous peer's worker threads park
        warm_up(self.run, self.warmup_s)
        counts, steal = _mode_counts(self.row.peer), steal_ms()
        t0 = time.perf_counter()
        self.run()
        self.row.times_ms.append((time.perf_counter() - t0) * 1e3)
        if counts is not None:
            self.alone += _mode_counts(self.row.peer)[0] - counts[0]
        after = steal_ms()
        if self.steal is not None and steal is not None and after is not None:
            self.steal += after - steal
        else:
            self.steal = None

    def finish(self) -> Row:
        row = self.row
        row.ms = statistics.median(row.times_ms)
        row.kv_bytes = 2 * row.B * HKV * row.context * D * _np_dtype(row.dtype).itemsize
        row.gbps = row.kv_bytes / (row.ms * 1e-3) / 1e9
        row.alone_calls, row.steal_ms = self.alone, self.steal
        return row


def measure_case(peers, B: int, context: int, dtype: str, inputs, repeats: int, warmup_s: float = WARMUP_S,
                 progress=None) -> list[Row]:
    """One row per peer: :data:`SETTLE_CALLS` calls of each peer — the first one's output
    checked against the first peer's (:data:`OUTPUT_TOLERANCE`; a peer computing other attention
    says ``n/a`` and is not timed) — then ``repeats`` rounds, each
    timing every peer once in a shuffled order (:func:`bench_common.rounds_of`), each timed call
    after ``warmup_s`` of the peer's calls back to back; a peer that cannot run says ``n/a`` and
    why."""
    rows, started = [], {}
    for peer in peers:
        try:
            started[peer] = _Peer(peer, B, context, dtype, inputs, warmup_s)
            rows.append(started[peer].row)
        except RuntimeError as exc:
            rows.append(Row(_case_name(B, context, dtype), peer, B, context, dtype, status="n/a", reason=str(exc)))
    # every peer computes the same attention as the first: its first call's output is compared
    # (that call is the first of its SETTLE_CALLS); a peer that differs is not timed
    reference = None  # (peer, rows): the first peer whose call returns an output
    for peer, p in list(started.items()):
        out = p.run()
        why = None
        if reference is not None:
            why = _output_mismatch(reference, out, B, dtype)
        else:
            try:
                rows_out = _output_rows(out, B)
            except ValueError:
                why = f"its output, of shape {getattr(out, 'shape', '?')}, is not ({B}, {HQ}, {D}) rows"
            else:
                if rows_out is not None:
                    reference = (peer, rows_out)
        if why is not None:
            p.row.status, p.row.reason = "n/a", why
            del started[peer]
            continue
        warm_up(p.run, 0.0, min_calls=SETTLE_CALLS - 1)
    for _, peer in rounds_of(list(started), repeats):
        if progress is not None:
            progress(B, context, dtype, peer)
        started[peer].time_once()
    for p in started.values():
        p.finish()
    return rows


def measure(peer: str, B: int, context: int, dtype: str, inputs, repeats: int, warmup_s: float = WARMUP_S) -> Row:
    """One peer alone: ``repeats`` timed calls, each after ``warmup_s`` of calls (:func:`measure_case`)."""
    return measure_case([peer], B, context, dtype, inputs, repeats, warmup_s)[0]


def run_benchmark(
    peers, repeats: int, batches=(1, 8), contexts=(4096, 32768), dtypes=DTYPES, progress=None,
    bandwidth_bytes: int | None = None, warmup_s: float = WARMUP_S,
):
    """``(rows, info)``: one row per (case, peer); info holds bandwidth runs (over
    ``bandwidth_bytes``, default :func:`probe_bytes`) and the load."""
    if bandwidth_bytes is None:
        bandwidth_bytes = probe_bytes()
    if "torch-sdpa" in peers:
        # torch imported before dotattn's first call, as in a user's process: imported after it,
        # torch's float16 SDPA ran 10–20× slower (B1 32k: 250–500 against 24 ms, 30 Nov 2026,
        # load 2.3): it then binds to the system libgomp that Numba's OpenMP layer loaded, not its
        # own (benchmarks/decode_torch_order.py); kernels/__init__.py now loads torch's runtime
        # first in every process, and this import keeps the peer's state out of the question
        try:
            import torch  # noqa: F401
        except ImportError:
            pass  # the torch-sdpa rows say n/a
    n_cores = cores()
    info = {
        "load_before": load_average(),
        "bandwidth_bytes": bandwidth_bytes,
        "bandwidth_gbps_runs": read_bandwidth(nbytes=bandwidth_bytes),
        "cores": n_cores,
        "all_cores_gbps_runs": read_bandwidth(nbytes=bandwidth_bytes, threads=n_cores),
    }
    rows = []
    for B in batches:
        for context in contexts:
            for dtype in dtypes:
                q, kc, vc = case_inputs(B, context, dtype)
                rows += measure_case(peers, B, context, dtype, (q, kc, vc), repeats, warmup_s, progress)
                del kc, vc
    info["bandwidth_gbps_runs"] += read_bandwidth(nbytes=bandwidth_bytes)
    info["all_cores_gbps_runs"] += read_bandwidth(nbytes=bandwidth_bytes, threads=n_cores)
    info["load_after"] = load_average()
    bandwidth = statistics.median(info["bandwidth_gbps_runs"])
    all_cores = statistics.median(info["all_cores_gbps_runs"])
    info["bandwidth_gbps"] = bandwidth
    info["all_cores_gbps"] = all_cores
    for r in rows:
        if r.gbps is not None:
            r.share_of_bandwidth = r.gbps / bandwidth
            r.share_of_all_cores = r.gbps / all_cores
            if r.peer == "torch-sdpa":
                r.sdpa_bound = (r.ms * 1e-3) / (r.kv_bytes / (all_cores * 1e9))
    fill_ratios(rows)
    return rows, info


def print_table(rows, info) -> None:
    from rich.table import Table

    console = table_console()
    bw = info["bandwidth_gbps"]
    table = Table(
        title=(
            f"decode: 1 query × B, Hq {HQ}, Hkv {HKV}, D {D} — median ms; GB/s (10⁹ B/s) of K/V read; "
            f"share of the NumPy one-thread read {bw:.1f} GB/s and of the all-core read "
            f"{info['all_cores_gbps']:.1f} GB/s ({info['cores']} threads); × sdpa = torch time / ours; "
            "bound = torch time / time to read the K/V at the all-core read"
        )
    )
    for col in ("case", "peer", "ms", "GB/s", "share", "all-core", "× sdpa", "note"):
        table.add_column(col, justify="left" if col in ("case", "peer", "note") else "right", overflow="fold")

    def cells(r):
        note = "" if r.sdpa_bound is None else f"bound on × sdpa {r.sdpa_bound:.2f}"
        if r.alone_calls:  # the choice ran calls on one thread: a busy machine, or a moment of one
            note = f"{r.alone_calls}/{len(r.times_ms)} calls alone (one thread)"
        cpu_ms = sum(r.times_ms) * cores()  # the cores' time during the timed calls
        if r.steal_ms is not None and cpu_ms > 0 and r.steal_ms > STEAL_NOTE_SHARE * cpu_ms:
            note = (note + "; " if note else "") + f"host steal {r.steal_ms:.0f} ms"
        return (
            r.case, r.peer, f"{r.ms:.2f}", f"{r.gbps:.1f}", f"{r.share_of_bandwidth:.0%}",
            f"{r.share_of_all_cores:.0%}",
            "" if r.ratio_vs_sdpa is None else f"{r.ratio_vs_sdpa:.2f}",
            note,
        )

    add_case_rows(table, rows, cells)
    console.print(table)
    runs = ", ".join(f"{x:.1f}" for x in info["bandwidth_gbps_runs"])
    all_runs = ", ".join(f"{x:.1f}" for x in info["all_cores_gbps_runs"])
    console.print(
        f"read bandwidth runs (GB/s, over {info.get('bandwidth_bytes', BANDWIDTH_BYTES) >> 20} MiB): "
        f"one thread {runs}; all cores {all_runs}; "
        f"load before {info['load_before']}, after {info['load_after']}"
    )


def run(args) -> int:
    peers = [p.strip() for p in args.peers.split(",") if p.strip()] if args.peers_given else list(DEFAULT_PEERS)
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        print(f"unknown decode peer(s) {unknown}; known: {list(PEERS)}", file=sys.stderr)
        return 2
    dtypes = (args.dtype,) if getattr(args, "dtype", None) else DTYPES  # (--dtype: that one only)
    if args.json:
        rows, info = run_benchmark(peers, args.repeats, dtypes=dtypes)
        print(json.dumps({"info": info, "rows": [asdict(r) for r in rows]}, indent=1))
        return 0
    def describe(B, context, dtype, peer):
        return f"B{B} ctx{context} {dtype} · {peer}"

    with progress_steps(2 * 2 * len(dtypes) * len(peers) * args.repeats, describe) as step:
        rows, info = run_benchmark(peers, args.repeats, progress=step, dtypes=dtypes)
    print_table(rows, info)
    return 0
