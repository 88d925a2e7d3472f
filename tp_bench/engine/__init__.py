"""The engine: a session (validate, build), the step driver (the only training loop), a run with
its results and fault handling, profiling and the parity check."""
