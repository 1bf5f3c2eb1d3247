"""``expertswap serve``: the engine behind an OpenAI-compatible HTTP API (a front end, like the app and the CLI)."""
