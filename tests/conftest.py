"""Test-suite set-up: ``import helpers`` from any test directory, hypothesis settings, and
``@pytest.mark.slow`` tests left out unless ``-m`` asks (``pytest -m slow`` runs the
exhaustive sweeps).

``helpers`` is registered as a module rather than by putting ``tests/`` on ``sys.path``: a
test folder named after a library (``tests/torch``) on the path would import as an empty
namespace package wherever the real library is missing.  For the same reason pytest runs
with ``--import-mode=importlib`` (pyproject.toml), which leaves ``sys.path`` alone.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

# Kernels the cpu backend generates for user score_mod/mask_mod functions go to a cache folder
# inside the checkout (git-ignored), not the user's ~/.cache, and survive between runs.
os.environ.setdefault("DOTATTN_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".dotattn-test-cache"))

# float32's product route: the split route wherever AMX runs (the tests that check the MKL
# route pin it with DOTATTN_F32_PRODUCTS), not the route this machine measured faster at
# install (kernels/f32_route.py) — so every machine's suite runs the same routes.
os.environ["DOTATTN_F32_ROUTE_FILE"] = "none"

# Without a GPU the triton backend's tests run its kernels through Triton's interpreter, which
# must be chosen before triton is first imported (torch._dynamo imports it, so any earlier
# torch.compile test would otherwise fix the compiled mode for the whole worker).  It only
# changes how triton runs; nothing else in the suite uses triton on a CPU-only machine.
if not os.path.isdir("/proc/driver/nvidia/gpus") or not os.listdir("/proc/driver/nvidia/gpus"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

if "helpers" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("helpers", Path(__file__).resolve().parent / "helpers.py")
    _helpers = importlib.util.module_from_spec(_spec)
    sys.modules["helpers"] = _helpers
    _spec.loader.exec_module(_helpers)

settings.register_profile(
    "dotattn",
    deadline=None,  # the first call of a backend may JIT-compile; speed is not what these tests measure
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile("dotattn")


def pytest_collection_modifyitems(config, items):
    """Leave ``@pytest.mark.slow`` tests out unless a ``-m`` expression asks for markers, and
    ``@pytest.mark.gpu`` tests out where no CUDA device exists (deselected, not skipped: a
    machine without a GPU is a platform limit, not a broken install); ``@pytest.mark.heavy``
    tests go first."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        import torch  # only when GPU tests were collected; they import it themselves anyway

        if not torch.cuda.is_available():
            config.hook.pytest_deselected(items=gpu)
            items[:] = [item for item in items if not item.get_closest_marker("gpu")]
    # The longest tests first (a stable sort: the rest keep their order), so that no long test
    # starts near the end of the run: in file order the user-kernel compiles (≈ 70–110 s each
    # beside the other worker) landed last on one worker and the other sat idle for ≈ 4 minutes
    # of a 15-minute run.  xdist's load scheduling gives them all to one worker's first chunk
    # (an eighth of the suite in a row); the other worker takes more of the rest.  (Its
    # one-at-a-time and work-stealing modes balanced no better here — 942 and 930 s against
    # 931 — and split modules between workers: the work-stealing run met the order-dependent
    # bits of issue 9's stop-71 note.)
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)
    if config.getoption("markexpr"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


def pytest_sessionfinish(session, exitstatus):
    """Under ``make test`` every extra is installed, so a skip there means an install failed.

    ``DOTATTN_NO_SKIPS=1`` (set by the Makefile) turns any skipped test into a failed run, so
    a missing framework or model package cannot hide core tests behind "skipped".
    """
    if os.environ.get("DOTATTN_NO_SKIPS") != "1" or exitstatus != 0:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    # a missing CPU feature is no failed install: those skips (helpers.lacks) are listed, not failed
    HARDWARE_SKIP = sys.modules["helpers"].HARDWARE_SKIP
    hardware = [r for r in skipped if HARDWARE_SKIP in str(r.longrepr)]
    if hardware:
        reporter.write_line(f"DOTATTN_NO_SKIPS=1: {len(hardware)} test(s) skipped for a CPU feature this machine lacks:")
        features = sorted({str(r.longrepr).split(HARDWARE_SKIP, 1)[1].split(":", 1)[0] for r in hardware})
        reporter.write_line("  " + ", ".join(features))
    skipped = [r for r in skipped if r not in hardware]
    if skipped:
        reporter.write_line(
            f"DOTATTN_NO_SKIPS=1: {len(skipped)} test(s) skipped — every extra should be installed here:",
            red=True,
        )
        for report in skipped[:20]:
            reporter.write_line(f"  {report.nodeid}: {report.longrepr}")
        session.exitstatus = 1
