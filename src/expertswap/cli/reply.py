"""How a reply ended, the same for ``generate`` and ``chat``."""

from __future__ import annotations

import sys


def finish_reason(generated: int, limit: int, wanted: int, context: int | None) -> str:
    """Why a reply ended ("stop": the model ended it, "length": the token limit, "context": the context is full);
    the last is said on stderr, since the reply is shorter than asked for."""
    if generated < limit:
        return "stop"
    if limit == wanted:
        return "length"
    print(f"expertswap-cli: the reply stopped at the {context}-token context after {generated} of {wanted} new "
          "tokens", file=sys.stderr)
    return "context"
