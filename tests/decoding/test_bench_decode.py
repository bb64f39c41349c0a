"""``dotattn bench --shapes decode`` runs and reports what it claims (tiny sizes; no timing asserted)."""

from __future__ import annotations

import pytest

from dotattn import bench_decode


def test_rows_and_ratios():
    pytest.importorskip("torch")
    rows, info = bench_decode.run_benchmark(
        ["dotattn", "dotattn-paged", "torch-sdpa"], 1, batches=(1,), contexts=(300,), dtypes=("float16",),
        bandwidth_bytes=8 << 20,
    )
    assert [r.peer for r in rows] == ["dotattn", "dotattn-paged", "torch-sdpa"]
    assert all(r.status == "ok" and r.gbps > 0 for r in rows), rows
    assert rows[2].ratio_vs_sdpa == 1.0
    assert info["bandwidth_gbps"] > 0 and info["load_before"] and info["load_after"]
    assert rows[0].case == "B1-ctx300-float16"


def test_unknown_peer_is_refused(capsys):
    import argparse

    args = argparse.Namespace(peers="dotattn,nope", peers_given=True, repeats=1, json=True)
    assert bench_decode.run(args) == 2
    assert "nope" in capsys.readouterr().err
