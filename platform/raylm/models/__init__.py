"""Model sizes, construction and FLOP accounting. No distributed code here.

:mod:`raylm.models.shapes` holds the named sizes (no torch, so that config
checks stay light); :mod:`raylm.models.registry` builds models and counts
their parameters and FLOPs.
"""
