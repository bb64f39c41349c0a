"""Test-suite set-up: ``import helpers`` from any test directory, and hypothesis profiles.

Profiles (``HYPOTHESIS_PROFILE=…``): ``default`` keeps the suite fast; ``thorough`` runs more
examples (use it with ``-m slow`` for the exhaustive sweep).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parent))

settings.register_profile(
    "default",
    deadline=None,  # the first call of a backend may JIT-compile; speed is not what these tests measure
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "thorough",
    parent=settings.get_profile("default"),
    max_examples=500,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_collection_modifyitems(config, items):
    """Leave ``@pytest.mark.slow`` tests out unless a ``-m`` expression asks for markers."""
    if config.getoption("markexpr"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
