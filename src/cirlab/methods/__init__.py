"""Methods: each is a module over the one training engine, configured by the ``method`` section.

``METHODS`` maps a config's ``method.name`` to the module that implements it. A trainable
method offers ``build(cfg) -> (model, train_data, evaluate_callback)`` for ``cirlab train`` and
optionally ``export(model, run)``; an evaluable one offers
``evaluate(cfg, backbone, split, out=None) -> {row name: metrics}`` for ``cirlab eval`` (``out``:
the eval run folder, for files such as a top-K export) and optionally
``predict(cfg, backbone, split, out=None) -> {row name: (ranked ids, subset ranked ids)}`` for
splits without targets (the CIRR test submission).
"""

METHODS = {
    "bidirectional": "cirlab.methods.bidirectional",
    "pretrain": "cirlab.methods.pretrain",
    "rerank": "cirlab.methods.rerank",
    "zeroshot": "cirlab.methods.zeroshot",
}
