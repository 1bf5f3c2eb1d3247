"""Entry point of the frozen app (PyInstaller needs a script; the console script does the same)."""

import sys

from expertswap.app.main import main

if __name__ == "__main__":
    sys.exit(main())
