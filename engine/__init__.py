"""Inference engine: a resident committee of MoE experts under a byte budget. Never imports Qt."""
