"""ExpertSwap: chat with Mixture-of-Experts models on machines too small to hold them.

``engine`` is the decode runtime (no Qt), ``models`` manages model folders, ``app`` is the Qt window and
``cli`` the terminal front end; the front ends use ``engine`` and ``models`` through their public names.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("expertswap")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "unknown"
