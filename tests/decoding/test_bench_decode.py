"""``dotattn bench --shapes decode`` runs and reports what it claims (tiny sizes; no timing asserted)."""

from __future__ import annotations

import numpy as np
import pytest

from dotattn import bench_decode


def test_rows_and_ratios():
    pytest.importorskip("torch")
    rows, info = bench_decode.run_benchmark(
        ["dotattn", "dotattn-paged", "torch-sdpa"], 1, batches=(1,), contexts=(300,), dtypes=("float16",),
        bandwidth_bytes=8 << 20, warmup_s=0.0,
    )
    assert [r.peer for r in rows] == ["dotattn", "dotattn-paged", "torch-sdpa"]
    assert all(r.status == "ok" and r.gbps > 0 for r in rows), rows
    assert rows[2].ratio_vs_sdpa == 1.0
    assert info["bandwidth_gbps"] > 0 and info["load_before"] and info["load_after"]
    assert info["all_cores_gbps"] > 0 and info["cores"] >= 1
    # the bound is torch's time over the time to read the bytes at the all-core read
    sdpa = rows[2]
    assert sdpa.sdpa_bound == pytest.approx(sdpa.ms * 1e-3 * info["all_cores_gbps"] * 1e9 / sdpa.kv_bytes)
    assert rows[0].sdpa_bound is None and rows[0].share_of_all_cores == pytest.approx(rows[0].gbps / info["all_cores_gbps"])
    assert rows[0].case == "B1-ctx300-float16"


def test_read_bandwidth_in_threads():
    runs = bench_decode.read_bandwidth(repeats=2, nbytes=8 << 20, threads=2)
    assert len(runs) == 2 and all(x > 0 for x in runs)


@pytest.mark.parametrize("loop", ["sum_parts", "sum_parts_lanes"])
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_the_all_core_read_sums_every_part(parts, loop):
    from dotattn.kernels import stream_read

    buf = (np.arange(parts * 16 * 100 + 5) % 7).astype(np.float32)  # small integers: exact sums
    n = buf.size // parts // 16 * 16
    expect = [buf[p * n : (p + 1) * n].sum(dtype=np.float64) for p in range(parts)]
    np.testing.assert_array_equal(getattr(stream_read, loop)(buf, parts), expect)
    assert getattr(stream_read, loop) in stream_read.READ_LOOPS


def test_unknown_peer_is_refused(capsys):
    import argparse

    args = argparse.Namespace(peers="dotattn,nope", peers_given=True, repeats=1, json=True)
    assert bench_decode.run(args) == 2
    assert "nope" in capsys.readouterr().err


def test_each_peer_is_warmed_up_for_a_time_before_its_timed_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(bench_decode, "PAUSE_S", 0.0)
    monkeypatch.setattr(bench_decode, "_make_peer", lambda *a: lambda: calls.append(1))
    row = bench_decode.measure("dotattn", 1, 300, "float32", (None, None, None), 4, warmup_s=0.05)
    assert row.status == "ok" and len(row.times_ms) == 4
    assert len(calls) >= 4 * (3 + 1)  # each round: warm-up calls (0.05 s, at least 3), the timed one
    calls.clear()
    assert bench_decode.warm_up(lambda: calls.append(1), 0.0) == 3 == len(calls)


def test_a_size_class_explores_before_the_first_round(monkeypatch):
    """Each peer makes SETTLE_CALLS calls back to back before its first round, so that a size
    class's first calls — the pool-or-alone choice's exploration: pool, pool, alone, alone — are
    not timed, however long a call takes against WARMUP_S."""
    from dotattn.kernels import cpu_decode

    assert bench_decode.SETTLE_CALLS >= 5  # the choice's four exploring calls, then a chosen one
    log = []
    monkeypatch.setattr(bench_decode, "PAUSE_S", 0.0)
    monkeypatch.setattr(bench_decode, "_make_peer", lambda peer, *a: lambda: log.append(peer))
    bench_decode.measure_case(["dotattn", "torch-sdpa"], 1, 300, "float32", (None,) * 3, 2, warmup_s=0.0)
    assert log[: 2 * bench_decode.SETTLE_CALLS] == ["dotattn"] * bench_decode.SETTLE_CALLS + ["torch-sdpa"] * bench_decode.SETTLE_CALLS
    assert len(log) == 2 * bench_decode.SETTLE_CALLS + 2 * 2 * (3 + 1)  # then 2 rounds × 2 peers × (3 warm-up + 1 timed)

    # and with the real choice on a fresh class, its exploration (two calls alone) is over when
    # those first calls end
    monkeypatch.undo()
    monkeypatch.setattr(bench_decode, "PAUSE_S", 0.0)
    monkeypatch.setattr(cpu_decode, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(cpu_decode, "_CHOICES", {})
    counts = [cpu_decode.mode_counts()]
    warm_up = bench_decode.warm_up

    def counted_warm_up(*args, **kwargs):
        calls = warm_up(*args, **kwargs)
        counts.append(cpu_decode.mode_counts())
        return calls

    monkeypatch.setattr(bench_decode, "warm_up", counted_warm_up)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, bench_decode.HQ, 1, bench_decode.D)).astype(np.float32)
    kc = rng.standard_normal((1, bench_decode.HKV, 600, bench_decode.D)).astype(np.float32)
    bench_decode.measure("dotattn", 1, 600, "float32", (q, kc, kc.copy()), 1, warmup_s=0.0)
    alone, pool = (a - b for a, b in zip(counts[1], counts[0]))  # after the first SETTLE_CALLS calls
    assert alone >= 2 and alone + pool == bench_decode.SETTLE_CALLS  # (the fifth: the faster mode)
    assert [c.ran for c in cpu_decode._CHOICES.values()] == [[True, True]]


def test_dotattn_rows_count_their_timed_calls_run_alone(monkeypatch):
    """Each dotattn row says how many of its timed calls the pool-or-alone choice ran on one
    thread (a row timed alone is one thread's speed: 1 Dec 2026, B8 32k bfloat16)."""
    from dotattn.kernels import cpu_decode

    monkeypatch.setattr(bench_decode, "PAUSE_S", 0.0)
    monkeypatch.setattr(cpu_decode, "PARALLEL_MIN_BYTES", 0)  # tiny calls take the choice's path
    monkeypatch.setattr(cpu_decode, "_CHOICES", {})
    # the first SETTLE_CALLS calls, then three rounds, each three warm-up calls then the timed
    # one; the timed ones: alone (False), pool (True), alone
    settle = [True] * bench_decode.SETTLE_CALLS
    modes = iter(settle + [True] * 3 + [False] + [True] * 3 + [True] + [True] * 3 + [False])
    monkeypatch.setattr(cpu_decode.ParallelChoice, "choose", lambda self: next(modes))
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, bench_decode.HQ, 1, bench_decode.D)).astype(np.float32)
    kc = rng.standard_normal((1, bench_decode.HKV, 600, bench_decode.D)).astype(np.float32)
    row = bench_decode.measure("dotattn", 1, 600, "float32", (q, kc, kc.copy()), 3, warmup_s=0.0)
    assert row.status == "ok" and row.alone_calls == 2
    torch_row = bench_decode.measure("torch-sdpa", 1, 600, "float32", (q, kc, kc.copy()), 1, warmup_s=0.0)
    assert torch_row.alone_calls is None


def test_rows_note_the_hosts_steal_time(monkeypatch, capsys):
    """A row whose timed calls lost more than STEAL_NOTE_SHARE of the cores' time to the
    hypervisor (``/proc/stat``'s steal) says so; ``steal_ms`` is the difference around them."""
    clock = iter([1000.0, 1100.0, 1200.0, 1300.0, 1300.0, 1400.0, 1500.0, 1600.0])  # around each timed call
    monkeypatch.setattr(bench_decode, "PAUSE_S", 0.0)
    monkeypatch.setattr(bench_decode, "steal_ms", lambda: next(clock))
    monkeypatch.setattr(bench_decode, "_make_peer", lambda *a: lambda: None)
    row = bench_decode.measure("torch-sdpa", 1, 300, "float32", (None, None, None), 4, warmup_s=0.0)
    assert row.steal_ms == 400.0
    row.times_ms = [100.0] * 4  # 400 ms of calls on at most a few cores: 400 ms of steal is past 5 %
    row.ms, row.gbps, row.share_of_bandwidth, row.share_of_all_cores = 100.0, 1.0, 0.5, 0.5
    quiet = bench_decode.Row("B1-ctx300-float32", "dotattn", 1, 300, "float32", ms=100.0, times_ms=[100.0] * 4,
                             gbps=1.0, share_of_bandwidth=0.5, share_of_all_cores=0.5, steal_ms=1.0)
    bench_decode.print_table([row, quiet], {"bandwidth_gbps": 1.0, "all_cores_gbps": 2.0, "bandwidth_gbps_runs": [1.0],
                                            "all_cores_gbps_runs": [2.0], "load_before": "0", "load_after": "0", "cores": 2})
    out = capsys.readouterr().out
    assert out.count("host steal") == 1 and "host steal 400 ms" in out


def test_steal_ms_reads_proc_stat_or_says_none():
    value = bench_decode.steal_ms()
    assert value is None or value >= 0.0


def test_the_read_bandwidth_buffer_is_four_times_the_cpu_caches(monkeypatch):
    """The yardstick's buffer is at least CACHE_MULTIPLE times the CPU caches: a fixed 512 MiB
    was partly read from the L3 on a VM that reports 480 MiB of it (two threads: 25–30 GB/s
    against 19–23 from 1–2 GiB; docs/decoding-log.md, "Decode on the new host")."""
    monkeypatch.setattr(bench_decode, "cpu_cache_bytes", lambda: 480 << 20)
    assert bench_decode.probe_bytes() == 4 * (480 << 20)
    monkeypatch.setattr(bench_decode, "cpu_cache_bytes", lambda: 32 << 20)
    assert bench_decode.probe_bytes() == bench_decode.BANDWIDTH_BYTES  # never less than 512 MiB
    monkeypatch.setattr(bench_decode, "cpu_cache_bytes", lambda: 0)  # unknown: 512 MiB
    assert bench_decode.probe_bytes() == bench_decode.BANDWIDTH_BYTES

    # the run's reads (before and after the cases, one thread and all cores) use that size
    monkeypatch.setattr(bench_decode, "cpu_cache_bytes", lambda: 480 << 20)
    sizes = []
    monkeypatch.setattr(bench_decode, "read_bandwidth", lambda nbytes=None, threads=1: sizes.append(nbytes) or [1.0])
    rows, info = bench_decode.run_benchmark(["dotattn"], 1, batches=(), contexts=())
    assert sizes == [4 * (480 << 20)] * 4 and info["bandwidth_bytes"] == 4 * (480 << 20)


def test_cpu_cache_bytes_counts_each_cache_once():
    total = bench_decode.cpu_cache_bytes()
    assert total >= 0
    import os

    if os.path.isdir("/sys/devices/system/cpu/cpu0/cache"):
        assert total > 0


def test_every_peer_computes_the_same_attention():
    """The contiguous, paged and torch SDPA peers' outputs agree on a case (GQA fold, scale,
    visible keys), for each dtype — and the bench checks it in every case."""
    torch = pytest.importorskip("torch")
    for dtype in bench_decode.DTYPES:
        B, context = 2, 600  # three pages a sequence, the last partly used
        inputs = bench_decode.case_inputs(B, context, dtype)
        outs = {p: bench_decode._make_peer(p, B, context, dtype, *inputs)() for p in bench_decode.PEERS}
        assert isinstance(outs["torch-sdpa"], torch.Tensor)
        reference = ("dotattn", bench_decode._output_rows(outs["dotattn"], B))
        for peer, out in outs.items():
            assert bench_decode._output_mismatch(reference, out, B, dtype) is None, (dtype, peer)


def test_a_peer_computing_other_attention_is_not_timed(monkeypatch):
    """A peer whose output differs from the first peer's (here: SDPA with its default scale
    but the query heads mapped to K/V heads the other way round) says n/a and is not timed."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    monkeypatch.setattr(bench_decode, "PAUSE_S", 0.0)
    B, context, dtype = 1, 300, "float32"
    q, kc, vc = bench_decode.case_inputs(B, context, dtype)
    make = bench_decode._make_peer
    timed = []

    def make_peer(peer, *args):
        if peer != "torch-sdpa":
            return make(peer, *args)
        G = bench_decode.HQ // bench_decode.HKV
        tq = torch.from_numpy(q).view(B, G, bench_decode.HKV, bench_decode.D).transpose(1, 2)  # h = g·Hkv + kv

        def wrong():
            timed.append(1)
            with torch.no_grad():
                return F.scaled_dot_product_attention(tq, torch.from_numpy(kc), torch.from_numpy(vc))

        return wrong

    monkeypatch.setattr(bench_decode, "_make_peer", make_peer)
    rows = bench_decode.measure_case(["dotattn", "torch-sdpa"], B, context, dtype, (q, kc, vc), 2, warmup_s=0.0)
    assert rows[0].status == "ok" and len(rows[0].times_ms) == 2
    assert rows[1].status == "n/a" and "differs from dotattn's" in rows[1].reason, rows[1]
    assert timed == [1] and rows[1].times_ms == []  # the checked call only
    # and a peer whose output has another shape
    monkeypatch.setattr(bench_decode, "_make_peer", lambda peer, *a: make(peer, *a) if peer == "dotattn" else (lambda: np.zeros(3)))
    rows = bench_decode.measure_case(["dotattn", "torch-sdpa"], B, context, dtype, (q, kc, vc), 1, warmup_s=0.0)
    assert rows[1].status == "n/a" and "shape" in rows[1].reason


def test_units_are_stated(capsys):
    """GB/s are 10⁹ bytes a second (the code divides by 1e9), and the table says so, with the
    read buffer's size."""
    row = bench_decode.Row("B1-ctx300-float32", "dotattn", 1, 300, "float32", ms=1.0, times_ms=[1.0],
                           gbps=1.0, share_of_bandwidth=0.5, share_of_all_cores=0.5)
    bench_decode.print_table([row], {"bandwidth_gbps": 2.0, "all_cores_gbps": 2.0, "bandwidth_gbps_runs": [2.0],
                                     "all_cores_gbps_runs": [2.0], "load_before": "0", "load_after": "0", "cores": 2,
                                     "bandwidth_bytes": 2048 << 20})
    out = " ".join(capsys.readouterr().out.split())
    assert "10⁹ B/s" in out and "over 2048 MiB" in out
