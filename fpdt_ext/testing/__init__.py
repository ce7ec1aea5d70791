"""Running functions on several local processes (tests and benchmarks)."""
