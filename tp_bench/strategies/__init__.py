"""Strategies: one module per stack, each a ``parallelize`` (shard the model, return the plan it
applied) and a trainer; the shared torch-native trainer and DTensor steps; the registry."""
