"""TensorFlow loaded before Triton: a torch call is refused with the fix instead of killing the process.

Upstream conflict (no dotattn needed: ``import tensorflow, torch._dynamo``): both bundle LLVM,
and loading Triton (imported by ``torch._dynamo``, which torch's custom operators import on
first use) after TensorFlow aborts with "LLVM ERROR: inconsistency in registered CommandLine
options".  The real scenario runs in a fresh process; the decision itself is also checked
in-process with TensorFlow faked, which costs nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

from dotattn.errors import ImportOrderError

# TensorFlow's `import` also imports all of Keras (and scikit-learn through Keras' wrappers) to
# register optimizers — pure Python, ~60% of the import's time and no part of the conflict,
# which lives in TensorFlow's native library.  Blocking `keras` skips it (TensorFlow catches
# the ImportError); the script checks that the native library is loaded all the same, and the
# same lean import followed by `import torch._dynamo` still aborts the process (checked by hand:
# "LLVM ERROR: inconsistency in registered CommandLine options", exit 134).
REFUSED = """
import sys
sys.modules["keras"] = None
import tensorflow
assert "tensorflow.python._pywrap_tensorflow_internal" in sys.modules
import torch
import dotattn
x = torch.ones(1, 2, 3, 4)
try:
    print("SHAPE:", tuple(dotattn.attention(x, x, x, implementation="numpy").shape))
except dotattn.ImportOrderError as exc:
    print("REFUSED:", exc)
"""

FIXED = """
import torch, torch._dynamo
import tensorflow
import dotattn
x = torch.ones(1, 2, 3, 4)
print("SHAPE:", tuple(dotattn.attention(x, x, x, implementation="numpy").shape))
"""


def _require_tensorflow() -> None:
    """Skip where TensorFlow is absent, without importing it here: loaded into the test process
    before Triton, it would make every later torch custom-op call in this worker refused."""
    import importlib.util

    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("tensorflow is not installed")


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)


def test_torch_call_after_tensorflow_is_refused_not_fatal():
    """With Triton installed the call is refused with the fix; without it nothing conflicts and it runs."""
    _require_tensorflow()
    import importlib.util

    done = _run(REFUSED)
    assert done.returncode == 0, f"the process died (rc {done.returncode}): {done.stderr[-2000:]}"
    if importlib.util.find_spec("triton") is None:
        assert "SHAPE: (1, 2, 3, 4)" in done.stdout, done.stdout + done.stderr[-2000:]
        return
    assert "REFUSED:" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "before `import tensorflow`" in done.stdout and "torch._dynamo" in done.stdout


@pytest.mark.slow
def test_the_advised_import_order_works():
    _require_tensorflow()
    done = _run(FIXED)
    assert done.returncode == 0, f"the advised order failed (rc {done.returncode}): {done.stderr[-2000:]}"
    assert "SHAPE: (1, 2, 3, 4)" in done.stdout


def test_guard_decision(monkeypatch):
    """Refuses only while TensorFlow is loaded, Triton is installed and not loaded yet."""
    pytest.importorskip("torch")
    from dotattn.torch import _convert as guard

    monkeypatch.setattr(guard, "_LLVM_ORDER_CHECKED", False)
    monkeypatch.setattr(guard, "_TRITON_INSTALLED", None)  # looked up again, through the patch below
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else real_find_spec(name, *a))
    guard.check_torch_llvm_order()  # no TensorFlow: fine (and checked again next time)
    assert guard._LLVM_ORDER_CHECKED is False
    monkeypatch.setitem(sys.modules, "tensorflow", types.ModuleType("tensorflow"))
    with pytest.raises(ImportOrderError, match="import torch, torch._dynamo"):
        guard.check_torch_llvm_order()
    monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))
    guard.check_torch_llvm_order()  # Triton first: nothing can conflict any more
    assert guard._LLVM_ORDER_CHECKED is True
