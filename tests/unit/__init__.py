"""Fast single-process tests: pure functions, modules, the planner and benchmark arithmetic."""
