"""``dotattn bench``: a tiny shape set runs, JSON rows carry every field, bad arguments fail."""

from __future__ import annotations

import json

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


def test_time_calls_warms_up_then_times_each_repeat():
    """bench_common.time_calls (both `dotattn bench` tables): one untimed-in-the-list warm-up."""
    from dotattn.bench_common import time_calls

    calls = []
    first_s, times_ms = time_calls(lambda: calls.append(1), 3)
    assert len(calls) == 4 and len(times_ms) == 3 and first_s >= 0 and all(t >= 0 for t in times_ms)
