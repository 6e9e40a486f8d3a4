"""cirlab: composed image retrieval (reference image + modification text -> target image).

``cirlab.load(folder)`` returns a trained model (a :class:`~cirlab.composers.Composer`) from the
folder ``cirlab train`` exports; it encodes gallery images and composes queries.

Layout mirrors the architecture: ``data`` (datasets, the shapes benchmark, preprocessing),
``models`` (backbone adapters and heads), ``composers`` (trained models as objects),
``methods`` (one module per method over the engine), ``training`` (the engine),
``evaluation`` (metrics, protocols, the evaluation path, submissions), ``retrieval`` (features).
"""

__version__ = "0.1.0"
__all__ = ["load"]


def __getattr__(name: str):
    if name == "load":  # lazily: `cirlab --help` should not import torch
        from cirlab.composers import load

        return load
    raise AttributeError(f"module 'cirlab' has no attribute {name!r}")
