from tp_bench.frontends.cli import entry

entry()
