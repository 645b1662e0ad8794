"""What the tests and the benchmarks share: servers in subprocesses, tiny models, probes, request builders, faults."""
