"""Turning prompts into tokens: the step door, sessions, the compact and graphed steps, the decoding loop."""
