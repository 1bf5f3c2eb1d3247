"""``python -m expertswap.cli``: the same as ``expertswap-cli``."""

import sys

from expertswap.cli import main

sys.exit(main())
