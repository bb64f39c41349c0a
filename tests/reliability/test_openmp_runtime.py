"""One OpenMP runtime, torch's, whatever the import order (kernels/__init__.py).

torch's libraries ask for ``libgomp.so.1`` and get the runtime already loaded under that name.
A process that ran a dotattn kernel before ``import torch`` used to give them the system's
(loaded by Numba's OpenMP layer), and torch's float16 SDPA then ran 10–40× slower
(benchmarks/decode_torch_order.py).  Checked in a fresh process: which ``libgomp`` files end
up mapped, and which runtime the name resolves to.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

SCRIPT = """
import numpy as np
import dotattn, numba
from dotattn.kernels import _cpu_model_ops as ops
x, w, y = np.ones((1, 8), np.float32), np.ones((8, 8), np.float32), np.empty((1, 8), np.float32)
ops.gemv(x, w, y, 2)  # a parallel kernel: Numba's threading layer is loaded now
assert "torch" not in __import__("sys").modules
print("LAYER", numba.threading_layer())
import ctypes, os
import torch
own = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
mapped = {line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line}
print("OWN_MAPPED", own in mapped)
# the runtime a library asking for libgomp.so.1 gets (torch's libtorch_cpu does) is the first
# one loaded under that name: the process-wide symbol is that runtime's
first = ctypes.cast(ctypes.CDLL(None).omp_get_max_threads, ctypes.c_void_p).value
theirs = ctypes.cast(ctypes.CDLL(own).omp_get_max_threads, ctypes.c_void_p).value
print("SAME", first == theirs)
torch.set_num_threads(2)
x = torch.ones(64, 64, dtype=torch.float16)
print("SUM", float((x @ x).float().sum()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps (Linux)")
def test_a_dotattn_kernel_before_import_torch_leaves_torch_its_own_openmp_runtime():
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=dict(os.environ)
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "LAYER omp" in lines  # Numba's OpenMP layer ran the kernel (it loads the system's libgomp)
    assert "OWN_MAPPED True" in lines and "SAME True" in lines, out.stdout  # torch runs on its own runtime
    assert "SUM 262144.0" in lines
