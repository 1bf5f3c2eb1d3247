"""Entry point of the frozen app (PyInstaller needs a script; the console script does the same).

The build carries the default model's teacher GGUF beside the app's files (``sys._MEIPASS``): the one
place that knows it points the model builder at it, so the runtime has no frozen-app code.
"""

import os
import sys
from pathlib import Path

from expertswap.app.main import main
from expertswap.models.default_model.gguf_source import ENV_GGUF, GGUF_NAME

if __name__ == "__main__":
    if bundle := getattr(sys, "_MEIPASS", None):
        os.environ.setdefault(ENV_GGUF, str(Path(bundle) / GGUF_NAME))
    sys.exit(main())
