"""The process's resident memory from Linux's ``/proc``: the current size and the kernel's own
peak (``VmHWM``), which writing ``5`` to ``/proc/self/clear_refs`` resets to the current size —
a peak measured with nothing running beside the measured code.  Used by ``dotattn bench`` and
``dotattn demo memory``; elsewhere the calls raise :class:`OSError` (or return False)."""

from __future__ import annotations

import re
from pathlib import Path


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``); OSError where there is none."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def reset_peak_rss() -> bool:
    """Reset the kernel's peak resident size (``VmHWM``) to the current one; False where the
    system has no such switch."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return status_kib("VmHWM") > 0
    except OSError:
        return False
