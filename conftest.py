"""In-repo glue: fixtures and hooks live in tp_bench.pytest_plugin (loaded by its pytest11 entry
point once the package is installed)."""
