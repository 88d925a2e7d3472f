"""pytest plugin for the benchmark suite (tests_bench/): fixtures, markers, rank-0 JSON."""
