"""Qt (PySide6) desktop app; talks to the engine only through expertswap.engine."""
