"""First calls from several threads at once, in a fresh process (a server's handlers).

The CPU kernels' modules — and Numba, whose modules import each other in cycles — are imported
at the first call.  Four threads making their first calls together used to import them
concurrently, and a thread could see a partially initialized Numba module: "implementation='cpu'
is not available here: cannot import name 'NullCache' from partially initialized module
'numba.core.caching'" in 8 of 9 cold starts (an audit, 6 Dec 2026), the backend then recorded as
unavailable for the rest of the process, and ``implementation=None`` running another backend
with other bits.  Now the kernels' modules are imported under one lock (``registry._IMPORT_LOCK``).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("numba")

SCRIPT = textwrap.dedent(
    """
    import sys, threading, traceback
    import numpy as np
    import dotattn
    assert "numba" not in sys.modules, "import dotattn should not import Numba (the first call does)"
    impl = None if sys.argv[1] == "none" else sys.argv[1]
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 4, 64, 32), dtype=np.float32) for _ in range(3))
    kc = rng.standard_normal((1, 2, 100, 32), dtype=np.float32)
    vc = rng.standard_normal((1, 2, 100, 32), dtype=np.float32)
    qd = rng.standard_normal((1, 4, 1, 32), dtype=np.float32)

    def fwd():
        return dotattn.attention(q, k, v, causal=True, implementation=impl)

    def dec():
        return dotattn.attention_with_kvcache(qd, kc, vc, cache_lengths=np.array([50]), implementation=impl)

    calls = [fwd, dec, fwd, dec]
    results, errors = [None] * 4, []
    barrier = threading.Barrier(4)

    def run(i):
        barrier.wait()
        try:
            results[i] = calls[i]()
        except BaseException:
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a first call hung"
    assert not errors, errors
    from dotattn import registry
    assert "cpu" not in registry._UNAVAILABLE, registry._UNAVAILABLE
    # the same bits as the calls made alone now, on the cpu backend
    for i, f in enumerate(calls):
        alone = f() if impl == "cpu" else (dotattn.attention(q, k, v, causal=True, implementation="cpu") if f is fwd else
                                          dotattn.attention_with_kvcache(qd, kc, vc, cache_lengths=np.array([50]), implementation="cpu"))
        assert np.array_equal(np.asarray(results[i]), np.asarray(alone)), f"thread {i} differs from the call alone"
    print("ok")
    """
)


@pytest.mark.parametrize("implementation", ["cpu", "none"])
def test_first_calls_from_four_threads_at_once(implementation):
    done = subprocess.run([sys.executable, "-c", SCRIPT, implementation], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


def test_an_import_that_failed_for_another_reason_than_a_missing_package_is_tried_again(tmp_path, monkeypatch):
    """A missing package stays recorded (no import at every call); any other ImportError (a
    module seen half-imported, say) is asked again at the next call instead of leaving the
    backend unavailable for the rest of the process."""
    from dotattn import registry

    (tmp_path / "dotattn_flaky_backend.py").write_text(textwrap.dedent(
        """
        import builtins
        if not getattr(builtins, "_dotattn_flaky_seen", False):
            builtins._dotattn_flaky_seen = True
            raise ImportError("cannot import name 'X' from partially initialized module 'y'")
        class Flaky:
            def available(self):
                return True, ""
        """
    ))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry._SPECS, "flaky", ("dotattn_flaky_backend", "Flaky"))
    monkeypatch.setitem(registry._SPECS, "absent", ("dotattn_no_such_module_anywhere", "Nothing"))
    try:
        assert registry._load("flaky") is None and "partially initialized" in registry._UNAVAILABLE["flaky"]
        assert registry._load("flaky") is not None  # asked again: loads
        assert "flaky" not in registry._UNAVAILABLE and "flaky" not in registry._RETRY
        assert registry._load("absent") is None and "absent" not in registry._RETRY  # a missing module: recorded
    finally:
        import builtins

        for name in ("flaky", "absent"):
            registry._INSTANCES.pop(name, None)
            registry._UNAVAILABLE.pop(name, None)
            registry._RETRY.discard(name)
        sys.modules.pop("dotattn_flaky_backend", None)
        if hasattr(builtins, "_dotattn_flaky_seen"):
            del builtins._dotattn_flaky_seen
