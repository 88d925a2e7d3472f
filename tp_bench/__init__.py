"""tp_bench: compare tensor-parallel training implementations on the same model, data and GPUs."""

__version__ = "0.1.0"
