"""cirlab: composed image retrieval (reference image + modification text -> target image).

Layout mirrors the architecture: ``data`` (datasets, the shapes benchmark, preprocessing),
``models`` (backbone adapters), ``methods`` (one module per method over the engine),
``training`` (the engine), ``evaluation`` (metrics, protocols, submissions),
``retrieval`` and ``serving`` (indexes and the service).
"""

__version__ = "0.1.0"
