"""``expertswap``: the desktop app, or with ``serve`` first the HTTP API (which never loads Qt)."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"]:
        from expertswap.cli.serve import main as serve

        return serve(args[1:])
    from expertswap.app.main import main as app

    return app(args)
