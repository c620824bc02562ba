"""raylm: train, tune and serve transformer language models on Ray."""

__version__ = "0.1.0"
