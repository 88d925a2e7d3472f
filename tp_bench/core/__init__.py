"""The core: options (declared once), parallel dims and mesh, process group, data, metrics,
precision, the results file. Imports nothing else of tp_bench."""
