"""Methods: each is a module over the one training engine, configured by the ``method`` section.

``METHODS`` maps a config's ``method.name`` to its module. Every module offers
``config_model(data, source)``, which validates the section into the typed model of its stage
(unknown keys are errors; the resolved defaults are written into a run's ``config.yaml``). A
trainable method offers ``build(cfg) -> Stage`` (:class:`cirlab.methods.common.Stage`) for
``cirlab train``; an evaluation-only one ``composers(cfg)`` for ``cirlab eval --config``.
"""

from __future__ import annotations

import importlib
from typing import Any

METHODS = {
    "bidirectional": "cirlab.methods.bidirectional",
    "pretrain": "cirlab.methods.pretrain",
    "projection": "cirlab.methods.projection",
    "rerank": "cirlab.methods.rerank",
    "spn": "cirlab.methods.spn",
    "zeroshot": "cirlab.methods.zeroshot",
}


def method_module(name: Any, source: str = "config"):
    if name not in METHODS:
        raise ValueError(f"invalid config {source}:\n  method.name: must be one of {sorted(METHODS)}, got {name!r}")
    return importlib.import_module(METHODS[name])


def method_config(data: dict, source: str = "config"):
    """The typed config of a ``method`` section."""
    return method_module(data.get("name"), source).config_model(data, source)
