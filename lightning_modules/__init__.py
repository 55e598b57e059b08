"""LightningModules: thin wiring of topdown networks, losses and metrics."""
