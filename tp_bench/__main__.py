from tp_bench.cli import entry

entry()
