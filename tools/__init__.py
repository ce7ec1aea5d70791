"""Command-line tools (run as scripts; importable as a package by the tests and benchmarks)."""
