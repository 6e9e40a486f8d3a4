"""Retrieval over stored image features: the feature cache (and, later, the index built on it)."""
