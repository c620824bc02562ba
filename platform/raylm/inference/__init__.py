"""raylm.inference: the engine that eval and serving share (batched generation, scoring, task adapters)."""
