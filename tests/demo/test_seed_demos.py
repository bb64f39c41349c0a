"""`dotattn demo scaling` and `dotattn demo memory` on small settings: pictures and numbers."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="the 'cli' extra is not installed")
pytest.importorskip("rich", reason="the 'cli' extra is not installed")

from dotattn.cli import main  # noqa: E402
from dotattn.demo import memory, scaling  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000, f"{path}: {len(data)} bytes"


@pytest.fixture(scope="module")
def scaling_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling")
    return scaling.run_scaling(argparse.Namespace(out=str(out), quick=True, seed=0))


def test_scaling_picture_is_written(scaling_result):
    _assert_png(scaling_result["png"])
    assert len(scaling_result["conclusion"]) == 2


def test_scaled_scores_keep_unit_variance_unscaled_grow_with_dk(scaling_result):
    res = scaling_result["results"]
    for d_k in scaling.D_KS:
        assert 0.7 < res[True][d_k]["variance"] < 1.3, d_k
        assert 0.7 * d_k < res[False][d_k]["variance"] < 1.3 * d_k, d_k


def test_unscaled_softmax_saturates_and_its_gradient_vanishes(scaling_result):
    res, n = scaling_result["results"], scaling_result["n"]
    big = scaling.D_KS[-1]
    assert res[True][big]["entropy"] > res[False][big]["entropy"] + 2.0
    assert res[True][big]["entropy"] > 0.8 * np.log(n)
    assert res[False][big]["max_prob"] > 0.8
    assert res[True][big]["max_prob"] < 0.2
    unscaled_entropy = [res[False][d]["entropy"] for d in scaling.D_KS]
    assert unscaled_entropy == sorted(unscaled_entropy, reverse=True)
    assert res[False][big]["grad_median"] < res[False][scaling.D_KS[0]]["grad_median"] / 20
    scaled_grads = [res[True][d]["grad_median"] for d in scaling.D_KS]
    assert max(scaled_grads) < 1.5 * min(scaled_grads)


def test_scaling_gradient_is_the_softmax_jacobian_product():
    """The demo's gradient (dotattn's dbias) equals P ∘ (dP − rowsum(dP ∘ P)) by hand."""
    from dotattn import attention, attention_backward

    rng = np.random.default_rng(3)
    q, k, v, g = (rng.standard_normal((2, 16, 8)) for _ in range(4))
    bias = np.zeros((2, 16, 16))
    out, lse, p = attention(q, k, v, bias=bias, scale=1.0, return_lse=True, return_weights=True)
    ds = attention_backward(q, k, v, out, lse, g, bias=bias, scale=1.0, return_dbias=True)[3]
    dp = g @ np.swapaxes(v, -1, -2)
    np.testing.assert_allclose(ds, p * (dp - (dp * p).sum(-1, keepdims=True)), atol=1e-10)


def test_naive_attention_matches_dotattn():
    from dotattn import attention

    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((100, memory.D)).astype(np.float32) for _ in range(3))
    np.testing.assert_allclose(memory.naive_attention(q, k, v), attention(q, k, v), atol=2e-5)


@pytest.fixture(scope="module")
def memory_result(tmp_path_factory):
    """The quick sweep, through the CLI in a subprocess: the demo fixes the allocator's mmap
    threshold for its whole process, which the test process should not inherit."""
    out = tmp_path_factory.mktemp("memory")
    proc = subprocess.run(
        [sys.executable, "-m", "dotattn.cli", "demo", "memory", "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    figures = json.loads((out / "memory.json").read_text())
    return {"png": out / "memory.png", "figures": figures, "stdout": proc.stdout}


def _peak(figures, name, n):
    return figures[name][str(n)]["peak_bytes"]


def test_memory_picture_and_the_budget_stop(memory_result):
    _assert_png(memory_result["png"])
    fig = memory_result["figures"]
    # quick: a 16 MiB budget lets the naive version run 512 and 1024 (3·N²·4 bytes), not 2048
    assert sorted(map(int, fig["naive"])) == [512, 1024] and fig["skipped"] == [2048]
    assert sorted(map(int, fig["dotattn"])) == [512, 1024, 2048]
    assert "needs" in memory_result["stdout"]


def test_naive_memory_grows_quadratically_dotattn_stays_small(memory_result):
    fig = memory_result["figures"]
    # the N × N float32 matrices are really there: at least two of them at once
    assert _peak(fig, "naive", 1024) >= 2 * 1024 * 1024 * 4
    # and grow as N²: from 512 to 1024 by at least two matrices' growth (fixed overheads cancel)
    assert _peak(fig, "naive", 1024) - _peak(fig, "naive", 512) >= 2 * (1024**2 - 512**2) * 4
    # dotattn at 2048 holds far less than one 2048² matrix (the naive version holds three).  Its
    # peak is a fixed ≈ 2–4 MB of per-thread tiles plus O(N) arrays: 2.9 MB with 256×256 forward
    # tiles, 5.0 MB with the 256×512 ones of dense float32 calls (+2.1 MB at every N from 2048
    # to 16384, measured) — so the bound is half a matrix, 8.4 MB
    assert _peak(fig, "dotattn", 2048) < 2048 * 2048 * 4 / 2


def test_measure_counts_a_known_allocation():
    seconds, peak, _ = memory.measure(lambda: np.ones(4 << 20, dtype=np.float64))  # 32 MiB
    assert seconds >= 0 and 30 << 20 <= peak <= 40 << 20


def test_demo_cli_scaling_prints_the_conclusion(tmp_path, capsys):
    assert main(["demo", "scaling", "--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "Without 1/√d_k" in printed and "With 1/√d_k" in printed
    _assert_png(tmp_path / "scaling.png")
