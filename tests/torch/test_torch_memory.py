"""Forward + backward through autograd keeps O(L) memory: no L × L matrix, measured.

Runs ``benchmarks/torch_memory.py``'s measurement in a fresh process (peak RSS above the
inputs, Linux only) at L = 8192, where one L × L float32 matrix is 256 MiB.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch.nn.functional")  # a real PyTorch, not the tests/torch directory

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "torch_memory.py"


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak-RSS reset needs Linux /proc")
def test_forward_backward_peak_memory_is_far_below_one_score_matrix():
    L = 8192
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--child", "dotattn", str(L), "1", "64"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    # The outputs and gradients themselves take 4 · L · 64 · 4 bytes = 8 MiB; an L × L float32
    # matrix would be 256 MiB.  Allow the first well under a quarter of the second.  On AMX the
    # float32 split route adds O(L) operand pieces (6 bytes an element per layout): with all
    # five backward products (since 1 Dec) Q's and dO's in two layouts each and Kᵀ's, 51.6 MiB
    # at L 8192 against 39.6 with two (DOTATTN_F32_PRODUCTS=amx), hence 56, not 48.
    assert row["scores_mib"] == 256
    assert row["peak_extra_mib"] < 56, row
