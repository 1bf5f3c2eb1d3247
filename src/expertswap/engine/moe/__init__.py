"""One MoE layer under a budget: the committee, its slots, its residency bookkeeping and its miss policies."""
