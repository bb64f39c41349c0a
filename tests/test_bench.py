"""``dotattn bench``: a tiny shape set runs, JSON rows carry every field, bad arguments fail."""

from __future__ import annotations

import json
import statistics
import time

import pytest

from dotattn import bench, cli

FIELDS = {
    "case",
    "peer",
    "structure",
    "mode",
    "B",
    "Hq",
    "Hkv",
    "Lq",
    "Lk",
    "D",
    "status",
    "reason",
    "ms",
    "times_ms",
    "first_s",
    "gflops",
    "flop",
    "ratio_vs_sdpa",
    "peak_mib",
}


def test_tiny_json_rows(capsys):
    assert (
        cli.main(
            [
                "bench",
                "--shapes",
                "tiny",
                "--repeats",
                "2",
                "--json",
                "--peers",
                "dotattn-cpu,dotattn-numpy,numpy-naive",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    cases = bench.SHAPE_SETS["tiny"]()
    assert len(rows) == 3 * len(cases)
    for row in rows:
        assert set(row) == FIELDS
        if row["status"] == "ok":
            assert row["ms"] > 0 and len(row["times_ms"]) == 2 and row["gflops"] > 0
            assert min(row["times_ms"]) <= row["ms"] <= max(row["times_ms"])
        else:
            assert row["status"] == "n/a" and row["reason"]
    # the naive peer has no backward: n/a with its reason
    naive_bwd = [r for r in rows if r["peer"] == "numpy-naive" and r["mode"] == "fwdbwd"]
    assert naive_bwd and all(r["status"] == "n/a" and r["reason"] == "forward only" for r in naive_bwd)


def test_tiny_set_holds_the_small_call_shapes():
    """`dotattn bench --shapes tiny`: issue 8's shapes, each with torch SDPA in the same run."""
    shapes = {(c.B, c.Hq, c.kv_heads, c.Lq, c.Lk, c.D, c.structure, c.mode) for c in bench.SHAPE_SETS["tiny"]()}
    assert (64, 4, 4, 11, 11, 16, "causal", "fwd") in shapes
    assert (1, 9, 3, 1, 128, 64, "dense", "fwd") in shapes
    assert (1, 12, 12, 128, 128, 64, "dense", "fwd") in shapes
    assert "torch-sdpa" in bench.DEFAULT_PEERS


def test_ratio_is_sdpa_time_over_peer_time():
    rows = [
        bench.Row("c", "torch-sdpa", "dense", "fwd", 1, 1, 1, 4, 4, 4, ms=10.0),
        bench.Row("c", "dotattn-cpu", "dense", "fwd", 1, 1, 1, 4, 4, 4, ms=5.0),
    ]
    bench.fill_ratios(rows)
    assert rows[1].ratio_vs_sdpa == pytest.approx(2.0) and rows[0].ratio_vs_sdpa == pytest.approx(1.0)


def test_flop_counts_visible_pairs():
    dense = bench.Case("d", 1, 2, 8, 8, 4)
    causal = bench.Case("c", 1, 2, 8, 8, 4, "causal", mode="fwdbwd")
    window = bench.Case("w", 1, 1, 8, 8, 4, "window1")
    docs = bench.Case("s", 1, 1, 8, 8, 4, "docs2")
    assert dense.flops() == 4 * 2 * 64 * 4
    assert causal.flops() == 3.5 * 4 * 2 * 36 * 4
    assert window.visible_pairs() == 8 * 3 - 2
    assert docs.visible_pairs() == 32 and docs.dense_mask().sum() == 32


def test_table_and_plot(tmp_path, capsys):
    png = tmp_path / "bench.png"
    assert (
        cli.main(
            [
                "bench",
                "--shapes",
                "tiny",
                "--repeats",
                "1",
                "--peers",
                "dotattn-cpu,numpy-naive",
                "--plot",
                str(png),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "dotattn-cpu" in out and "n/a" in out
    assert png.stat().st_size > 1000


def test_unknown_peer_is_refused(capsys):
    assert cli.main(["bench", "--peers", "nope"]) == 2
    assert "unknown peer" in capsys.readouterr().err


def test_registered_peer_runs():
    bench.register_peer("const", lambda case, x: lambda: None)
    try:
        row = bench.measure(
            bench.SHAPE_SETS["tiny"]()[0], "const", bench._inputs(bench.SHAPE_SETS["tiny"]()[0]), 1
        )
        assert row.status == "ok" and row.ms is not None
    finally:
        del bench.PEERS["const"]


def test_rounds_interleave_every_peer_once_per_round_in_a_seeded_order():
    """bench_common.rounds_of (both `dotattn bench` tables): each round names every peer once;
    the orders vary between rounds and are the same on every run."""
    from dotattn.bench_common import rounds_of

    got = list(rounds_of(["a", "b", "c"], 6))
    assert [r for r, _ in got] == [r for r in range(6) for _ in range(3)]
    orders = [tuple(p for r, p in got if r == k) for k in range(6)]
    assert all(sorted(o) == ["a", "b", "c"] for o in orders) and len(set(orders)) > 1
    assert got == list(rounds_of(["a", "b", "c"], 6))


def test_peers_of_a_case_are_timed_in_rounds(monkeypatch):
    """`dotattn bench`: every peer's warm-up first, then round after round one timed call of each
    peer — a peer's timed calls are spread over the case, not back to back."""
    monkeypatch.setattr(bench, "PAUSE_S", 0.0)
    log = []

    def slow(name):
        def factory(case, x):
            def run():
                log.append(name)
                time.sleep(0.025)  # past ROUND_WARM_S: no untimed calls before a timed one

            return run

        return factory

    def unavailable(case, x):
        raise bench.Unavailable("not here")

    monkeypatch.setitem(bench.PEERS, "one", slow("one"))
    monkeypatch.setitem(bench.PEERS, "two", slow("two"))
    monkeypatch.setitem(bench.PEERS, "none", unavailable)
    case = bench.SHAPE_SETS["tiny"]()[0]
    rows = bench.measure_case(case, ["one", "none", "two"], bench._inputs(case), 3)
    assert [r.peer for r in rows] == ["one", "none", "two"]
    assert rows[1].status == "n/a" and rows[1].reason == "not here" and rows[1].times_ms == []
    assert log[:4] == ["one", "one", "two", "two"]  # each peer's warm-up call and its sizing call
    timed = log[4:]
    assert len(timed) == 6 and all(sorted(timed[2 * r : 2 * r + 2]) == ["one", "two"] for r in range(3))
    for r in (rows[0], rows[2]):
        assert len(r.times_ms) == 3 and all(t >= 25.0 for t in r.times_ms) and r.ms == statistics.median(r.times_ms)
        assert r.first_s >= 0.025 and r.gflops > 0


def test_short_calls_are_warm_before_each_timed_call(monkeypatch):
    monkeypatch.setattr(bench, "PAUSE_S", 0.0)
    calls = []
    monkeypatch.setitem(bench.PEERS, "fast", lambda case, x: lambda: calls.append(1))
    case = bench.SHAPE_SETS["tiny"]()[0]
    (row,) = bench.measure_case(case, ["fast"], bench._inputs(case), 2)
    assert len(row.times_ms) == 2
    assert len(calls) > 2 + 2 * 2  # untimed calls before each timed one


def _resident_block(mib: int):
    import numpy as np

    return np.ones(mib * 2**20 // 8)  # ones: every page written, so resident


@pytest.mark.parametrize("kernel_peak", [True, False], ids=["kernel-peak", "sampling-thread"])
def test_peak_rss_sees_a_block_freed_inside_it(monkeypatch, kernel_peak):
    import threading

    if kernel_peak and not bench._reset_peak_rss():
        pytest.skip("this system cannot reset its peak resident size (/proc/self/clear_refs)")
    if not kernel_peak:
        monkeypatch.setattr(bench, "_reset_peak_rss", lambda: False)
    threads_before = threading.active_count()
    with bench._PeakRss() as mem:
        # the kernel's peak needs no thread beside the measured code; the fallback samples in one
        assert threading.active_count() == threads_before + (0 if kernel_peak else 1)
        block = _resident_block(96)
        if not kernel_peak:
            time.sleep(0.05)  # the sampler's turns while the block is resident
        del block  # freed inside: only a peak sees it
    assert 80 <= mem.extra_mib < 200
    with bench._PeakRss() as mem:
        pass
    assert mem.extra_mib < 16  # the earlier block's peak does not carry over


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "tiny", "--peers", "dotattn-numpy,dotattn-numpy"], "--peers names dotattn-numpy more than once"),
    (["--shapes", "decode", "--peers", "dotattn,dotattn"], "--peers names dotattn more than once"),
    (["--shapes", "tiny", "--peers", ","], "--peers names no peer"),
    (["--shapes", "decode", "--peers", ""], "--peers names no peer"),
    (["--shapes", "decode", "--repeats", "0"], "--repeats must be ≥ 1, got 0"),
    (["--shapes", "decode", "--plot", "x.png"], "--shapes decode has no plot"),
    (["--shapes", "tiny", "--plot", "noext"], "--plot must name a .png file"),
    (["--shapes", "tiny", "--plot", "{tmp}"], "--plot must name a .png file"),
    (["--shapes", "tiny", "--plot", "{tmp}/d.png"], "is a folder"),
])
def test_bad_flags_are_refused_before_any_work(argv, message, tmp_path, capsys, monkeypatch):
    """Until 7 Dec 2026 a repeated peer gave an untimed "ok" row (and the decode table a
    traceback), an empty list ran an empty benchmark (the decode set after minutes of bandwidth
    probes), the decode set took --repeats 0 (a traceback at the end) and ignored --plot, and a
    bad --plot path failed after the whole run (review of 7 Dec)."""
    (tmp_path / "d.png").mkdir()
    ran = []
    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: ran.append(1) or [])
    from dotattn import bench_decode

    monkeypatch.setattr(bench_decode, "run_benchmark", lambda *a, **k: ran.append(1) or ([], {}))
    assert cli.main(["bench", *(a.format(tmp=tmp_path) for a in argv)]) == 2
    assert message in capsys.readouterr().err
    assert ran == []


def test_a_peer_library_failing_is_its_rows_reason(capsys):
    """A peer library's own error (JAX's CPU dot refuses float16) made the whole bench a
    traceback with nothing printed; now that peer's rows say n/a and why (review of 7 Dec)."""
    bench.register_peer("broken", lambda case, x: (_ for _ in ()).throw(ValueError("no float16 dot here")))
    try:
        assert cli.main(["bench", "--shapes", "tiny", "--repeats", "1", "--peers", "dotattn-numpy,broken", "--json"]) == 0
    finally:
        del bench.PEERS["broken"]
    rows = json.loads(capsys.readouterr().out)
    broken = [r for r in rows if r["peer"] == "broken"]
    assert broken and all(r["status"] == "n/a" and "ValueError: no float16 dot here" in r["reason"] for r in broken)
    assert all(r["status"] == "ok" for r in rows if r["peer"] == "dotattn-numpy")


def test_decode_set_takes_one_dtype_when_given(monkeypatch, capsys):
    from dotattn import bench_decode

    seen = {}
    monkeypatch.setattr(bench_decode, "run_benchmark", lambda peers, repeats, **k: seen.update(k) or ([], {}))
    assert cli.main(["bench", "--shapes", "decode", "--dtype", "bfloat16", "--json", "--repeats", "1"]) == 0
    assert seen["dtypes"] == ("bfloat16",)
    assert cli.main(["bench", "--shapes", "decode", "--json", "--repeats", "1"]) == 0
    assert seen["dtypes"] == bench_decode.DTYPES
