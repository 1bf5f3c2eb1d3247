"""Process memory figures, the same way on Linux, macOS and Windows."""

from __future__ import annotations

import sys
from pathlib import Path

import psutil

_STATUS = Path("/proc/self/status")


def current_rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """Highest resident set size of this process so far.

    On Linux this reads VmHWM: getrusage's ru_maxrss survives exec, so a process started by a big
    parent would report the parent's peak.
    """
    if _STATUS.exists():
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    if sys.platform == "win32":
        return int(psutil.Process().memory_info().peak_wset)
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # bytes on macOS
