"""Seed-compatible entry point: ``torchrun --nproc_per_node=N benchmark.py --impl ... [options]``."""

from tp_bench.frontends.cli import entry

if __name__ == "__main__":
    entry()
