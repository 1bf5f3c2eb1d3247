"""What the engine counts and records: routing counters, traces, process memory."""
