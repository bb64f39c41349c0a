"""``dotattn bench``: dotattn against its peers, every peer in the same process.

One named shape set at a time; for each case (shape × structure × pass) every peer runs a
warm-up call (its time is reported as ``first_s``: it includes JIT compiles) and then
``--repeats`` rounds, each timing every peer once in a shuffled order (peers interleaved, so
that all of them sample the same stretch of a shared machine's time: :mod:`.bench_common`);
the table shows each peer's median.  GFLOP/s count the visible pairs::

    forward  = 4 · B · Hq · (visible (query, key) pairs) · D
    fwd+bwd  = 3.5 × forward          (the backward does 2.5 forwards of work)

(for dense attention the visible pairs are ``Lq·Lk``; causal about half; windows and
documents only what they show).  ``× sdpa`` is torch SDPA's median time divided by the
peer's (above 1 = faster than torch).  ``peak MiB`` is the growth of the process's resident
memory during the peer's calls (sampled every millisecond), so it shows materialized scores.

A peer that cannot run shows ``n/a`` and the reason.  Peers are plain functions registered in
``PEERS`` (:func:`register_peer`); front ends may add theirs.

    dotattn bench                         # the issue's table (forward, fwd+bwd, sparse)
    dotattn bench --shapes scaling --plot bench.png
    dotattn bench --shapes tiny --json    # machine-readable rows
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from ._proc_memory import reset_peak_rss as _reset_peak_rss
from ._proc_memory import status_kib
from .bench_common import PAUSE_S, add_case_rows, fill_ratios, progress_steps, rounds_of, table_console


# =================================================================================
# cases
# =================================================================================


@dataclass(frozen=True)
class Case:
    """One benchmark case: sizes, a structure and a pass.

    ``structure``: ``dense``, ``causal``, ``window<W>`` (window ``(W, W)``) or
    ``docs<N>`` (``N`` equal packed documents via segment ids).  ``mode``: ``fwd`` or
    ``fwdbwd``.
    """

    name: str
    B: int
    Hq: int
    Lq: int
    Lk: int
    D: int
    structure: str = "dense"
    mode: str = "fwd"
    Hkv: int | None = None

    @property
    def kv_heads(self) -> int:
        return self.Hq if self.Hkv is None else self.Hkv

    @property
    def window(self) -> int | None:
        return int(self.structure[6:]) if self.structure.startswith("window") else None

    @property
    def docs(self) -> int | None:
        return int(self.structure[4:]) if self.structure.startswith("docs") else None

    def visible_pairs(self) -> int:
        """(query, key) pairs a query sees, summed (bottom-right alignment, as dotattn)."""
        Lq, Lk = self.Lq, self.Lk
        pos = np.arange(Lq, dtype=np.int64) + (Lk - Lq)
        if self.structure == "dense":
            return Lq * Lk
        if self.structure == "causal":
            return int(np.clip(pos + 1, 0, Lk).sum())
        if self.window is not None:
            lo = np.clip(pos - self.window, 0, Lk)
            hi = np.clip(pos + self.window + 1, 0, Lk)
            return int((hi - lo).sum())
        if self.docs is not None:
            return Lq * (Lk // self.docs)
        raise ValueError(f"unknown structure {self.structure!r}")

    def flops(self) -> float:
        forward = 4.0 * self.B * self.Hq * self.visible_pairs() * self.D
        return forward * (3.5 if self.mode == "fwdbwd" else 1.0)

    def segment_ids(self) -> np.ndarray:
        return np.repeat(np.arange(self.docs), self.Lq // self.docs)[None].repeat(self.B, 0)

    def dense_mask(self) -> np.ndarray:
        """Bool (Lq, Lk) visibility, for peers that only take a materialized mask."""
        i = np.arange(self.Lq)[:, None] + (self.Lk - self.Lq)
        j = np.arange(self.Lk)[None, :]
        if self.structure == "causal":
            return j <= i
        if self.window is not None:
            return np.abs(i - j) <= self.window
        if self.docs is not None:
            seg = self.segment_ids()[0]
            return seg[:, None] == seg[None, :]
        return np.ones((self.Lq, self.Lk), dtype=bool)


def _issue_cases() -> list[Case]:
    return [
        Case("dense-h8-n4096-d64", 1, 8, 4096, 4096, 64),
        Case("dense-h4-n4096-d128", 1, 4, 4096, 4096, 128),
        Case("causal-h8-n4096-d64", 1, 8, 4096, 4096, 64, "causal"),
        Case("dense-h8-n4096-d64-fwdbwd", 1, 8, 4096, 4096, 64, mode="fwdbwd"),
        Case("window256-h8-n4096-d64", 1, 8, 4096, 4096, 64, "window256"),
        Case("docs8-h8-n4096-d64", 1, 8, 4096, 4096, 64, "docs8"),
    ]


SHAPE_SETS: dict[str, Callable[[], list[Case]]] = {
    "issue": _issue_cases,
    "scaling": lambda: [Case(f"dense-h8-n{n}-d64", 1, 8, n, n, 64) for n in (512, 1024, 2048, 4096, 8192)],
    "causal-scaling": lambda: [
        Case(f"causal-h8-n{n}-d64", 1, 8, n, n, 64, "causal") for n in (512, 1024, 2048, 4096, 8192)
    ],
    "backward": lambda: [
        Case("dense-h8-n4096-d64-fwdbwd", 1, 8, 4096, 4096, 64, mode="fwdbwd"),
        Case("causal-h8-n4096-d64-fwdbwd", 1, 8, 4096, 4096, 64, "causal", mode="fwdbwd"),
    ],
    "gqa": lambda: [Case("dense-h32kv8-n2048-d128", 1, 32, 2048, 2048, 128, Hkv=8)],
    # Real models' small calls (issue 8): a MiniLM-like causal batch, a SmolLM2 decode step
    # (GQA 9/3, one query row), one BERT-base-sized head set; the same batch forward+backward.
    "tiny": lambda: [
        Case("causal-b64-h4-n11-d16", 64, 4, 11, 11, 16, "causal"),
        Case("decode-h9kv3-q1-k128-d64", 1, 9, 1, 128, 64, Hkv=3),
        Case("dense-h12-n128-d64", 1, 12, 128, 128, 64),
        Case("causal-b64-h4-n11-d16-fwdbwd", 64, 4, 11, 11, 16, "causal", mode="fwdbwd"),
    ],
}


# =================================================================================
# peers: name → factory(case, inputs) returning a zero-argument callable, or raising Unavailable
# =================================================================================


class Unavailable(Exception):
    """A peer cannot run this case here; the message is the reason shown as ``n/a``."""


Peer = Callable[["Case", dict], Callable[[], Any]]
PEERS: dict[str, Peer] = {}


def register_peer(name: str, factory: Peer) -> None:
    """Add (or replace) a peer: ``factory(case, inputs) -> run()``; raise :class:`Unavailable` to decline.

    ``inputs`` holds float32 NumPy ``q (B,Hq,Lq,D)``, ``k``, ``v``, ``dout`` for the case.
    The torch front end's autograd row is registered this way (``dotattn-torch``).
    """
    PEERS[name] = factory


def _dotattn_options(case: Case) -> dict:
    if case.structure == "causal":
        return dict(causal=True)
    if case.window is not None:
        return dict(window=(case.window, case.window))
    if case.docs is not None:
        return dict(segment_ids=case.segment_ids())
    return {}


def _dotattn_peer(implementation: str) -> Peer:
    def factory(case: Case, x: dict):
        import dotattn

        options = _dotattn_options(case)
        if case.mode == "fwd":
            return lambda: dotattn.attention(x["q"], x["k"], x["v"], implementation=implementation, **options)

        def fwdbwd():
            out, lse = dotattn.attention(
                x["q"], x["k"], x["v"], implementation=implementation, return_lse=True, **options
            )
            return dotattn.attention_backward(
                x["q"], x["k"], x["v"], out, lse, x["dout"], implementation=implementation, **options
            )

        return fwdbwd

    return factory


def _naive_numpy(case: Case, x: dict):
    """The seeds' style: materialize the (B, Hq, Lq, Lk) scores, softmax, multiply."""
    if case.mode != "fwd":
        raise Unavailable("forward only")
    if x["dtype"] != "float32":
        raise Unavailable("float32 only")
    if case.kv_heads != case.Hq:
        raise Unavailable("no GQA")
    nbytes = case.B * case.Hq * case.Lq * case.Lk * 4 * 3
    if nbytes > 8 * 2**30:
        raise Unavailable(f"would materialize {nbytes / 2**30:.0f} GiB of scores")
    mask = None if case.structure == "dense" else case.dense_mask()

    def run():
        s = np.matmul(x["q"], np.swapaxes(x["k"], -1, -2)) * np.float32(1 / math.sqrt(case.D))
        if mask is not None:
            s = np.where(mask, s, np.float32(-np.inf))
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        s /= s.sum(axis=-1, keepdims=True)
        return np.matmul(s, x["v"])

    return run


def _import_torch():
    try:
        import torch
    except ImportError as exc:
        raise Unavailable(f"torch not importable: {exc}") from None
    return torch


def _torch_inputs(case: Case, x: dict, requires_grad: bool):
    torch = _import_torch()
    dtype = getattr(torch, x["dtype"])
    # from the float32 copies: torch.from_numpy does not take ml_dtypes' bfloat16
    ts = [torch.from_numpy(x[f"{n}32"]).to(dtype).requires_grad_(requires_grad) for n in ("q", "k", "v")]
    return torch, ts, torch.from_numpy(x["dout32"]).to(dtype)


def _torch_calls(case: Case, attend, kwargs: dict, q, k, v, dout):
    """The timed call of a torch peer: ``attend(q, k, v, **kwargs)`` without autograd, or its
    forward and backward when ``case.mode`` is ``"fwdbwd"``."""
    torch = _import_torch()

    def fwd():
        with torch.no_grad():
            return attend(q, k, v, **kwargs)

    def fwdbwd():
        for t in (q, k, v):
            t.grad = None
        attend(q, k, v, **kwargs).backward(dout)

    return fwd if case.mode == "fwd" else fwdbwd


def _torch_sdpa(case: Case, x: dict):
    torch, (q, k, v), dout = _torch_inputs(case, x, case.mode == "fwdbwd")
    import torch.nn.functional as F

    kwargs: dict[str, Any] = dict(enable_gqa=case.kv_heads != case.Hq)
    if case.structure == "causal" and case.Lq == case.Lk:
        kwargs["is_causal"] = True
    elif case.structure != "dense":
        kwargs["attn_mask"] = torch.from_numpy(case.dense_mask())  # SDPA has no sparse masks
    return _torch_calls(case, F.scaled_dot_product_attention, kwargs, q, k, v, dout)


def _torch_flex(case: Case, x: dict):
    if case.mode == "fwdbwd":
        raise Unavailable("FlexAttention has no backward on CPU")
    torch, (q, k, v), dout = _torch_inputs(case, x, False)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        raise Unavailable(f"no FlexAttention in this torch: {exc}") from None
    off = case.Lk - case.Lq
    if case.structure == "causal":

        def mask_mod(b, h, qi, kj):
            return kj <= qi + off
    elif case.window is not None:
        w = case.window

        def mask_mod(b, h, qi, kj):
            return (kj - qi - off).abs() <= w
    elif case.docs is not None:
        seg = torch.from_numpy(case.segment_ids()[0])

        def mask_mod(b, h, qi, kj):
            return seg[qi] == seg[kj]
    else:
        mask_mod = None
    block_mask = (
        None if mask_mod is None else create_block_mask(mask_mod, None, None, case.Lq, case.Lk, device="cpu")
    )
    compiled = torch.compile(flex_attention, dynamic=False)
    gqa = case.kv_heads != case.Hq

    def fwd():
        with torch.no_grad():
            return compiled(q, k, v, block_mask=block_mask, enable_gqa=gqa)

    return fwd


def _jax(case: Case, x: dict):
    if case.mode != "fwd":
        raise Unavailable("forward only in this bench")
    try:
        import jax
        import jax.numpy as jnp
    except ImportError as exc:
        raise Unavailable(f"jax not importable: {exc}") from None
    # jax.nn.dot_product_attention takes (B, L, N, H)
    q, k, v = (jnp.asarray(np.swapaxes(x[n], 1, 2)) for n in ("q", "k", "v"))
    kwargs: dict[str, Any] = {}
    if case.structure == "causal" and case.Lq == case.Lk:
        kwargs["is_causal"] = True
    elif case.window is not None:
        kwargs["local_window_size"] = (case.window, case.window)
    elif case.structure != "dense":
        kwargs["mask"] = jnp.asarray(case.dense_mask())[None, None]
    fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, **kwargs))
    return lambda: fn(q, k, v).block_until_ready()


def _dotattn_torch(case: Case, x: dict):
    """dotattn through the torch front end, forward + backward by autograd."""
    _, (q, k, v), dout = _torch_inputs(case, x, case.mode == "fwdbwd")
    try:
        import dotattn.torch  # noqa: F401
    except ImportError as exc:
        raise Unavailable(f"dotattn.torch not importable: {exc}") from None
    import dotattn

    return _torch_calls(case, dotattn.attention, _dotattn_options(case), q, k, v, dout)


register_peer("dotattn-cpu", _dotattn_peer("cpu"))
register_peer("dotattn-numpy", _dotattn_peer("numpy"))
register_peer("dotattn-torch", _dotattn_torch)
register_peer("torch-sdpa", _torch_sdpa)
register_peer("torch-flex", _torch_flex)
register_peer("jax", _jax)
register_peer("numpy-naive", _naive_numpy)

DEFAULT_PEERS = (
    "dotattn-cpu",
    "dotattn-numpy",
    "dotattn-torch",
    "torch-sdpa",
    "torch-flex",
    "jax",
    "numpy-naive",
)


# =================================================================================
# measuring
# =================================================================================


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRss:
    """Peak resident memory of a block, ``peak - baseline`` after.

    On Linux the kernel keeps the peak itself (``VmHWM``), and writing ``5`` to
    ``/proc/self/clear_refs`` resets it to the current size: nothing runs beside the timed call.
    Elsewhere a thread samples the resident size every millisecond; that thread wakes a
    thousand times a second and slowed both peers' calls by 8–12 % on a 2-core machine
    (docs/performance-log.md, "The bench's memory sampler"), so it is only the fallback.
    """

    def __enter__(self):
        self.base = self.peak = _rss_bytes()
        self._thread = None
        if _reset_peak_rss():
            return self
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        if self._thread is None:
            self.peak = max(self.peak, status_kib("VmHWM") * 1024)
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.base) / 2**20


@dataclass
class Row:
    case: str
    peer: str
    structure: str
    mode: str
    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    status: str = "ok"  # "ok" or "n/a"
    reason: str = ""
    ms: float | None = None
    times_ms: list[float] = field(default_factory=list)
    first_s: float | None = None
    gflops: float | None = None
    flop: float | None = None
    ratio_vs_sdpa: float | None = None
    peak_mib: float | None = None


DTYPES = ("float32", "bfloat16", "float16")


def _inputs(case: Case, seed: int = 0, dtype: str = "float32") -> dict:
    """q, k, v, dout in ``dtype`` (NumPy; bfloat16 from ml_dtypes), their float32 originals as
    ``q32``…, and the dtype's name."""
    import ml_dtypes  # a core dependency: NumPy's bfloat16

    rng = np.random.default_rng(seed)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    shapes = dict(
        q=(case.B, case.Hq, case.Lq, case.D),
        k=(case.B, case.kv_heads, case.Lk, case.D),
        v=(case.B, case.kv_heads, case.Lk, case.D),
        dout=(case.B, case.Hq, case.Lq, case.D),
    )
    x: dict[str, Any] = {"dtype": dtype}
    for name, shape in shapes.items():
        x[f"{name}32"] = rng.standard_normal(shape, dtype=np.float32)
        x[name] = x[f"{name}32"].astype(np_dtype)
    return x


# A short call's timed call in a round comes after untimed ones, back to back for about this
# long: after the round's pause the first call pays the cores' wake-up and cold caches (tens to
# hundreds of µs), which a 100 ms call does not notice and a 50 µs one would report as its time.
# Calls that take at least this long run alone (a warm call's time decides: ``_start``).
ROUND_WARM_S = 0.02


@dataclass
class _Started:
    """A peer whose warm-up ran: its row, its call, and how many untimed calls go before each
    round's timed one."""

    row: Row
    run: Callable[[], Any]
    warm_calls: int


def _new_row(case: Case, peer: str) -> Row:
    row = Row(
        case.name, peer, case.structure, case.mode, case.B, case.Hq, case.kv_heads, case.Lq, case.Lk, case.D
    )
    row.flop = case.flops()
    return row


def _start(case: Case, peer: str, inputs: dict) -> Row | _Started:
    """The peer's warm-up call (``first_s``: JIT compiles, loads) and one more untimed call, whose
    time sizes the rounds' warm-up; the row with ``n/a`` if the peer cannot run the case."""
    row = _new_row(case, peer)
    time.sleep(PAUSE_S)  # the previous peer's worker threads park
    try:
        run = PEERS[peer](case, inputs)
        with _PeakRss() as mem:
            t0 = time.perf_counter()
            run()
            t1 = time.perf_counter()
            run()
            warm_s = time.perf_counter() - t1
    except Unavailable as exc:
        row.status, row.reason = "n/a", str(exc)
        return row
    except Exception as exc:  # noqa: BLE001 - a peer's own failure is its row's reason
        # A peer library's error (JAX's CPU dot refusing float16: the whole bench ended in its
        # traceback until 7 Dec 2026) makes that peer n/a; dotattn's own errors stay loud.
        if peer.startswith("dotattn"):
            raise
        row.status, row.reason = "n/a", f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        return row
    row.first_s = t1 - t0
    row.peak_mib = mem.extra_mib
    warm_calls = 0 if warm_s >= ROUND_WARM_S else min(1000, math.ceil(ROUND_WARM_S / max(warm_s, 1e-6)))
    return _Started(row, run, warm_calls)


def _time_once(peer: _Started) -> None:
    """One round's turn: a pause, the warm-up calls if the call is short, one timed call."""
    time.sleep(PAUSE_S)  # the previous peer's worker threads park
    with _PeakRss() as mem:
        for _ in range(peer.warm_calls):
            peer.run()
        t0 = time.perf_counter()
        peer.run()
        peer.row.times_ms.append((time.perf_counter() - t0) * 1e3)
    peer.row.peak_mib = max(peer.row.peak_mib, mem.extra_mib)


def measure_case(case: Case, peers: list[str], inputs: dict, repeats: int, progress=None) -> list[Row]:
    """Every peer's warm-up, then ``repeats`` rounds, each timing every peer once in a shuffled
    order (:func:`bench_common.rounds_of`); one row per peer with the median of its timed calls,
    GFLOP/s and the peak memory of its calls."""
    rows, started = [], {}
    for peer in peers:
        if progress is not None:
            progress(case, peer)
        got = _start(case, peer, inputs)
        if isinstance(got, _Started):
            rows.append(got.row)
            started[peer] = got
        else:
            rows.append(got)
            for _ in range(repeats if progress is not None else 0):
                progress(case, peer)  # (its rounds: nothing to time)
    for _, peer in rounds_of(list(started), repeats):
        if progress is not None:
            progress(case, peer)
        _time_once(started[peer])
    for got in started.values():
        got.row.ms = statistics.median(got.row.times_ms)
        got.row.gflops = got.row.flop / (got.row.ms * 1e-3) / 1e9
    return rows


def measure(case: Case, peer: str, inputs: dict, repeats: int) -> Row:
    """One peer alone: its warm-up, then ``repeats`` timed calls (:func:`measure_case`)."""
    return measure_case(case, [peer], inputs, repeats)[0]


def run_benchmark(
    cases: list[Case], peers: list[str], repeats: int, progress=None, dtype: str = "float32"
) -> list[Row]:
    rows = []
    for case in cases:
        rows += measure_case(case, peers, _inputs(case, dtype=dtype), repeats, progress)
    fill_ratios(rows)
    return rows


# =================================================================================
# output
# =================================================================================


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def print_table(rows: list[Row], console=None, dtype: str = "float32") -> None:
    from rich.table import Table

    console = console or table_console()
    table = Table(title=f"dotattn bench ({dtype}, median; × sdpa = torch SDPA time / peer time)")
    for col, justify in (
        ("case", "left"),
        ("peer", "left"),
        ("ms", "right"),
        ("GFLOP/s", "right"),
        ("× sdpa", "right"),
        ("first s", "right"),
        ("peak MiB", "right"),
        ("note", "left"),
    ):
        table.add_column(col, justify=justify, overflow="fold")  # (see table_console)
    add_case_rows(table, rows, lambda r: (
        r.case,
        r.peer,
        _fmt(r.ms, ".3f" if r.ms is not None and r.ms < 10 else ".1f"),  # tiny calls take µs
        _fmt(r.gflops, ".1f"),
        _fmt(r.ratio_vs_sdpa, ".2f"),
        _fmt(r.first_s, ".2f"),
        _fmt(r.peak_mib, ".0f"),
        "",
    ))
    console.print(table)


def plot(rows: list[Row], path: str, dtype: str = "float32") -> None:
    """GFLOP/s against sequence length, one line per peer (cases of one structure and mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for peer in dict.fromkeys(r.peer for r in rows):
        pts = sorted((r.Lq, r.gflops) for r in rows if r.peer == peer and r.gflops)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=peer)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length Lq = Lk")
    ax.set_ylabel(f"GFLOP/s ({dtype})")  # (the run's dtype: "float32" was written on every run)
    ax.set_title(
        "attention throughput, one process, " + ", ".join(sorted({f"{r.structure} {r.mode}" for r in rows}))
    )
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# =================================================================================
# the subcommand
# =================================================================================


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shapes",
        default="issue",
        choices=sorted([*SHAPE_SETS, "decode"]),
        help="named shape set (default: issue); 'decode' benchmarks KV-cache decoding (dotattn.bench_decode)",
    )
    parser.add_argument(
        "--peers",
        default=",".join(DEFAULT_PEERS),
        help=f"comma-separated peers (default: all: {','.join(DEFAULT_PEERS)})",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="rounds after the warm-ups, each timing every peer once in a shuffled order (default 5)"
    )
    parser.add_argument(
        "--dtype", default=None, choices=DTYPES,
        help="input dtype of every peer (default float32; with --shapes decode, all three unless given)",
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--plot", metavar="PNG", help="also save GFLOP/s vs sequence length to this PNG")


def run(args: argparse.Namespace) -> int:
    # The flags are checked before any work, for every shape set (until 7 Dec 2026 the decode set
    # took --repeats 0, an empty or repeated peer list, and a --plot it never drew, and a bad
    # --plot path failed after the whole run): a usage error, exit status 2.
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    repeated = sorted({p for p in peers if peers.count(p) > 1})
    problem = None
    if not peers:
        problem = f"--peers names no peer, got {args.peers!r}"
    elif repeated:
        problem = f"--peers names {', '.join(repeated)} more than once (a peer is timed once a round)"
    elif args.repeats < 1:
        problem = f"--repeats must be ≥ 1, got {args.repeats}"
    elif args.plot and args.shapes == "decode":
        problem = "--plot draws GFLOP/s of the attention shape sets; --shapes decode has no plot (its figures are GB/s)"
    elif args.plot:
        from .viz import png_path

        try:
            png_path(args.plot, "--plot")
        except ValueError as exc:
            problem = str(exc)
    if problem:
        print(f"dotattn bench: error: {problem}", file=sys.stderr)
        return 2
    if args.shapes == "decode":  # its own cases, peers and figures (GB/s of K/V read)
        from . import bench_decode

        args.peers_given = args.peers != ",".join(DEFAULT_PEERS)
        return bench_decode.run(args)
    args.dtype = args.dtype or "float32"
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        print(f"unknown peer(s) {unknown}; known: {sorted(PEERS)}", file=sys.stderr)
        return 2
    cases = SHAPE_SETS[args.shapes]()
    if args.json:
        rows = run_benchmark(cases, peers, args.repeats, dtype=args.dtype)
        print(json.dumps([asdict(r) for r in rows], indent=1))
    else:
        steps = len(cases) * len(peers) * (1 + args.repeats)  # each peer's warm-up and its rounds
        with progress_steps(steps, lambda case, peer: f"{case.name} · {peer}") as step:
            rows = run_benchmark(cases, peers, args.repeats, progress=step, dtype=args.dtype)
        print_table(rows, dtype=args.dtype)
    if args.plot:
        try:
            plot(rows, args.plot, args.dtype)
        except OSError as exc:  # (the rows are printed above: the run is not lost)
            print(f"dotattn bench: error: cannot write {args.plot!r}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
