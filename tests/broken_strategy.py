"""pytest plugin for the suite's tests (``-p broken_strategy``; never used in production):
registers a strategy "broken" whose module fails to import, as a strategy with a missing
dependency would."""

from tp_bench.strategies import registry

registry.register("broken", "broken_strategy_module")
