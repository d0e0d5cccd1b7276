"""In-process device simulators for tests, demos and benchmarks (no hardware needed)."""
