"""Benchmarks: speed, memory and quality of ExpertSwap, written to benchmarks/results/."""
