"""The desktop app (PySide6). Importing it first takes back the import hook PySide6 installs.

PySide6 (checked on 6.11.3) replaces ``builtins.__import__`` with its ``__feature_import__`` hook,
which runs on every import statement of every thread: also the function-level imports that torch
and transformers execute while a model loads on a worker thread. With the GUI thread inside Qt's
painting at that moment the two deadlocked (about one run in ten of tests/test_app.py; in the app,
a window frozen mid-load). The app uses no ``from __feature__ import``, so Python's own import is
put back as soon as PySide6 is in.
"""

import builtins

_python_import = builtins.__import__

import PySide6.QtCore  # noqa: E402,F401  (this installs the hook)

if getattr(builtins.__import__, "__name__", "") == "__feature_import__" and _python_import is not builtins.__import__:
    builtins.__import__ = _python_import
