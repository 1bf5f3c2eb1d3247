"""The names a user picks an engine's behaviour by: miss policies, evictions, quantisations.

Each name's rules (which device a policy needs, what a format is) are the engine's; a front end only lists them.
"""

from __future__ import annotations

POLICIES = ("exact", "substitute", "skip", "cpu", "lowbit")  # what a routed expert that is not resident costs
THRESHOLD_POLICIES = ("skip",)  # the policies a skip threshold applies to
EVICTIONS = ("importance", "lru", "lfu")  # which resident expert a miss replaces
DEFAULT_EVICTION = "importance"  # chosen by replaying recorded traces: benchmarks/replay.py
QUANTIZATIONS = ("int8", "int4", "int4-g64", "int4-g128", "nf4", "fp4")  # experts quantised when read (--quantize)
