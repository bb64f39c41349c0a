"""``import dotattn`` plus a NumPy call must not import any framework (checked in a fresh process)."""

from __future__ import annotations

import json
import subprocess
import sys

FRAMEWORKS = ("torch", "jax", "tensorflow")

SCRIPT = """
import json, sys
import numpy as np
import dotattn

q = np.random.default_rng(0).standard_normal((2, 3, 17, 8)).astype(np.float32)
out, lse = dotattn.attention(q, q, q, causal=True, return_lse=True)
dotattn.attention_backward(q, q, q, out, lse, np.ones_like(out), causal=True)
dotattn.info()
print(json.dumps({"loaded": [m for m in FRAMEWORKS if m in sys.modules], "finite": bool(np.isfinite(out).all())}))
"""


def _run(script: str) -> dict:
    prelude = f"FRAMEWORKS = {FRAMEWORKS!r}\n"
    done = subprocess.run([sys.executable, "-c", prelude + script], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_numpy_call_imports_no_framework():
    result = _run(SCRIPT)
    assert result["finite"]
    assert result["loaded"] == []


def test_plain_import_imports_no_framework():
    result = _run('import json, sys\nimport dotattn\nprint(json.dumps({"loaded": [m for m in FRAMEWORKS if m in sys.modules]}))')
    assert result["loaded"] == []
