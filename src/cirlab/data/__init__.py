"""Datasets, the built-in shapes benchmark, and image preprocessing."""
