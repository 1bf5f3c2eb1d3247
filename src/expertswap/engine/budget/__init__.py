"""The budget: the planner (the one committee-size function), the controller, the swapper and the memory watcher."""
