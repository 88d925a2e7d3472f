"""Tensor-parallel strategies (see factory.py for the registry)."""
