"""Byte counts as people read them; the one formatter every front end and error message uses."""

from __future__ import annotations


def format_bytes(n: int | float) -> str:
    """Human-readable binary size, e.g. 1.5 GiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"
