"""The precompiled kernels of a read-only install (``kernels/_cpu_cache.py``).

A system-wide install used by another user, or a container's read-only root: the package's
``_precompiled`` directory cannot be written.  It used to be skipped — every kernel compiled
again, a first call of ≈ 150 s instead of 1 — and with no writable cache anywhere every call
failed with Numba's "cannot cache function …: no locator available".  Now its entries are
copied once into the user's cache (or, with none writable, read in place).  Checked in a
fresh process on a read-only copy of the package, as a user whose file modes bind (as root:
without the capabilities that override them).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dotattn
from dotattn.kernels import _cpu_cache

WORKER = """
import hashlib, json, warnings
import numpy as np
import dotattn
from dotattn.kernels import _cpu_cache, _cpu_kernels
q = np.random.default_rng(0).standard_normal((1, 2, 300, 16), dtype=np.float32)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out, lse = dotattn.attention(q, q, q, causal=True, return_lse=True, implementation="cpu")
    grads = dotattn.attention_backward(q, q, q, out, lse, out, causal=True, implementation="cpu")
print(json.dumps({"cache_dir": str(_cpu_cache.cache_dir()), "package": dotattn.__file__,
                  "digest": hashlib.sha256(b"".join(a.tobytes() for a in (out, lse, *grads))).hexdigest(),
                  "misses": sum(_cpu_kernels.forward.stats.cache_misses.values()),
                  "warnings": [str(w.message) for w in caught]}))
"""


def _as_a_plain_user() -> list[str]:
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: file modes would not bind")
    return [setpriv, "--bounding-set=-dac_override,-fowner,-dac_read_search"]


def _set_writable(root: Path, writable: bool) -> None:
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            mode = path.stat().st_mode
            path.chmod(mode | 0o200 if writable else mode & ~0o222)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="file modes and setpriv (Linux)")
@pytest.mark.parametrize("user_cache", ["writable", "read-only"])
def test_a_read_only_install_loads_its_precompiled_kernels(tmp_path, user_cache):
    cpu = pytest.importorskip("dotattn.kernels.cpu")
    cpu.precompile(("float32",))  # what `make install` did (a load when it already has)
    q = np.random.default_rng(0).standard_normal((1, 2, 300, 16), dtype=np.float32)
    out, lse = dotattn.attention(q, q, q, causal=True, return_lse=True, implementation="cpu")
    grads = dotattn.attention_backward(q, q, q, out, lse, out, causal=True, implementation="cpu")
    ours = hashlib.sha256(b"".join(a.tobytes() for a in (out, lse, *grads))).hexdigest()

    package = Path(dotattn.__file__).resolve().parent
    tree = tmp_path / "site"
    shutil.copytree(package, tree / "dotattn", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "home").mkdir()
    cache = tmp_path / "cache"
    cache.mkdir()
    _set_writable(tree, False)
    _set_writable(tmp_path / "home", False)
    if user_cache == "read-only":
        _set_writable(cache, False)
    env = dict(os.environ, PYTHONPATH=str(tree), HOME=str(tmp_path / "home"), NUMBA_CACHE_DIR=str(cache),
               DOTATTN_CACHE_DIR=str(cache))
    env.pop("XDG_CACHE_HOME", None)
    env.pop("DOTATTN_PRECOMPILED_DIR", None)
    try:
        done = subprocess.run(_as_a_plain_user() + [sys.executable, "-c", WORKER], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
    finally:
        _set_writable(tmp_path, True)
    assert done.returncode == 0, done.stderr[-3000:]
    child = json.loads(done.stdout.strip().splitlines()[-1])
    assert child["package"].startswith(str(tree))
    assert child["digest"] == ours
    assert child["misses"] == 0, child  # loaded, not compiled (a compile from scratch: ≈ 70 s here)
    if user_cache == "writable":
        assert child["cache_dir"].startswith(str(cache / "precompiled")), child  # the user's copy
    else:
        assert child["cache_dir"] == str(tree / "dotattn" / "kernels" / "_precompiled"), child  # read in place
    assert _cpu_cache.cache_dir() == _cpu_cache.PRECOMPILED_DIR  # (this process's own, writable)
