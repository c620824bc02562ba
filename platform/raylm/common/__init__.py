"""Shared plumbing: storage URIs, the MLflow client, cluster checks, fingerprints, logging."""
