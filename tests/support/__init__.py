"""Real parts the tests and benchmarks share: servers, a fault proxy, a scripted rlm-code."""
