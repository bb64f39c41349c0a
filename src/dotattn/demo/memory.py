"""``dotattn demo memory``: the O(N²) of naive attention against dotattn (seed 002).

The seed-style implementation materializes the ``N × N`` score matrix (and its exponential
and probabilities) before multiplying by ``V``: memory grows as N², and at 65,536 tokens one
float32 matrix alone is 16 GiB.  dotattn's tiled kernels never hold more than a block of
scores, so their extra memory grows as N (the output and the LSE).

Peak memory is the process's resident-set high-water mark above what it held before the
call (Linux ``/proc/self/clear_refs``), so it counts every allocation, NumPy's and the
compiled kernels' alike (and at least tracemalloc's count of NumPy's).  The naive version is not run where its predicted peak would
exceed the budget (default: 4 GiB or half the available memory, whichever is less).
"""

from __future__ import annotations

import json
import math
import re
import time
import tracemalloc
from pathlib import Path

import numpy as np

from .._proc_memory import reset_peak_rss, status_kib
from ..api import attention
from ._ui import console, out_dir, progress

D = 64
# scores, their exponential and the normalized probabilities may coexist (float32 each)
NAIVE_MATRICES = 3


def naive_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The seed's implementation: softmax(q·kᵀ/√d)·v with the N × N matrices materialized."""
    scores = q @ k.T / np.float32(math.sqrt(q.shape[-1]))
    exp = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = exp / exp.sum(axis=-1, keepdims=True)
    return probs @ v


def naive_peak_bytes(n: int) -> int:
    return NAIVE_MATRICES * n * n * 4


def _available_bytes() -> int:
    try:
        match = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        return int(match.group(1)) * 1024 if match else 8 << 30
    except OSError:
        return 8 << 30


def _fix_mmap_threshold() -> None:
    """Make glibc serve every allocation ≥ 128 KiB with its own mmap, returned on free.

    glibc raises its mmap threshold after big frees and then keeps freed arrays in the heap,
    so a later call's arrays reuse resident pages and the RSS high-water mark under-counts
    them.  A fixed threshold makes RSS follow the live big arrays.  Other C libraries: no-op.
    """
    import ctypes

    M_MMAP_THRESHOLD = -3
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):
        pass


def measure(fn, *args) -> tuple[float, int, str]:
    """(seconds, peak extra bytes, method) of ``fn(*args)``.

    The larger of two lower bounds: the RSS high-water mark above the RSS before the call
    (reset through /proc/self/clear_refs where Linux allows it; counts compiled kernels'
    allocations too) and tracemalloc's peak (NumPy's allocations only).
    """
    if reset_peak_rss():  # VmHWM from the current RSS on
        before = status_kib("VmRSS")
        method = "RSS high-water mark"
    else:
        before = None
        method = "tracemalloc (NumPy allocations only)"
    tracemalloc.start()
    try:
        start = time.perf_counter()
        result = fn(*args)
        seconds = time.perf_counter() - start
        _, traced = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    peak = traced
    if before is not None:
        peak = max(peak, (status_kib("VmHWM") - before) * 1024)
    del result
    return seconds, peak, method


def sweep(sizes, budget: int, seed: int = 0, on_step=None) -> dict:
    """``{"dotattn": {n: (s, bytes)}, "naive": {n: (s, bytes)}, "skipped": [n…], "method": str}``."""
    _fix_mmap_threshold()
    rng = np.random.default_rng(seed)
    warm = rng.standard_normal((64, D)).astype(np.float32)
    attention(warm, warm, warm)  # load/compile the backend outside the measurements
    results: dict = {"dotattn": {}, "naive": {}, "skipped": [], "method": ""}
    for n in sizes:
        q, k, v = (rng.standard_normal((n, D)).astype(np.float32) for _ in range(3))
        seconds, peak, method = measure(attention, q, k, v)
        results["dotattn"][n] = (seconds, peak)
        results["method"] = method
        if naive_peak_bytes(n) <= budget:
            seconds, peak, _ = measure(naive_attention, q, k, v)
            results["naive"][n] = (seconds, peak)
        else:
            results["skipped"].append(n)
        if on_step is not None:
            on_step(n)
        del q, k, v
    return results


def plot(results, path) -> None:
    from ._ui import pyplot

    plt = pyplot()
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name, style in (("naive", "s-"), ("dotattn", "o-")):
        ns = sorted(results[name])
        if not ns:
            continue
        ax_mem.plot(ns, [results[name][n][1] / 2**20 for n in ns], style, label=f"{name} (measured)")
        ax_time.plot(ns, [results[name][n][0] for n in ns], style, label=name)
    if results["skipped"]:
        ns = sorted(results["naive"])[-1:] + results["skipped"]
        ax_mem.plot(ns, [naive_peak_bytes(n) / 2**20 for n in ns], "s:", color="C0", alpha=0.6,
                    label=f"naive (would need; {NAIVE_MATRICES} N×N float32)")
    for ax in (ax_mem, ax_time):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.grid(alpha=0.3)
        ax.legend()
    ax_mem.set_ylabel("peak extra memory (MiB)")
    ax_time.set_ylabel("seconds")
    ax_mem.set_title(f"memory: naive grows as N², dotattn as N ({results['method']})", fontsize=10)
    ax_time.set_title("time: both are O(N²·d) work", fontsize=10)
    fig.suptitle(f"one head, d = {D}, float32", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_memory(args) -> dict:
    if args.quick:
        sizes, budget = [512, 1024, 2048], 16 << 20
    else:
        sizes = [512 * 2**i for i in range(8)]  # 512 … 65,536
        budget = min(4 << 30, _available_bytes() // 2)
    with progress() as bar:
        task = bar.add_task("memory sweep", total=len(sizes), note="")
        results = sweep(sizes, budget, seed=args.seed, on_step=lambda n: bar.update(task, advance=1, note=f"N={n:,}"))
    folder = out_dir(args)
    path = folder / "memory.png"
    plot(results, path)
    # The figures behind the plot, for people and tests (which run the sweep in a subprocess
    # because _fix_mmap_threshold changes the allocator of the whole process).
    figures = {
        "sizes": sizes, "budget_bytes": budget, "method": results["method"], "skipped": results["skipped"],
        **{name: {str(n): {"seconds": t, "peak_bytes": b} for n, (t, b) in results[name].items()} for name in ("dotattn", "naive")},
    }
    (folder / "memory.json").write_text(json.dumps(figures, indent=1))
    return {"results": results, "png": path, "json": folder / "memory.json", "budget": budget, "sizes": sizes}


def run(args) -> int:
    from rich.table import Table

    r = run_memory(args)
    res = r["results"]
    table = Table(title=f"naive vs dotattn, one head, d={D}, float32 — peak extra memory by {res['method']}", title_justify="left")
    for col in ("N", "naive MiB", "naive s", "dotattn MiB", "dotattn s"):
        table.add_column(col, justify="right")
    for n in r["sizes"]:
        d_s, d_b = res["dotattn"][n]
        if n in res["naive"]:
            n_s, n_b = res["naive"][n]
            naive_cells = (f"{n_b / 2**20:,.1f}", f"{n_s:.3f}")
        else:
            naive_cells = (f"(needs {naive_peak_bytes(n) / 2**30:,.0f} GiB)", "—")
        table.add_row(f"{n:,}", *naive_cells, f"{d_b / 2**20:,.1f}", f"{d_s:.3f}")
    console.print(table)
    console.print(f"naive runs only where {NAIVE_MATRICES}·N²·4 bytes ≤ the budget of {r['budget'] / 2**30:.2f} GiB")
    console.print(f"wrote {r['png']}")
    return 0
