"""A run from start to finish: train, export, evaluate, register, promote, lineage."""
