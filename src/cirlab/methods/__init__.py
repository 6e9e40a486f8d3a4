"""Methods: each is a module over the one training engine, configured by the ``method`` section.

``METHODS`` maps a config's ``method.name`` to the module that implements it. A trainable
method offers ``build(cfg) -> (model, train_data, evaluate_callback)`` for ``cirlab train`` and
optionally ``export(model, run)``; an evaluable one offers
``evaluate(cfg, backbone, split) -> {row name: metrics}`` for ``cirlab eval``.
"""

METHODS = {
    "bidirectional": "cirlab.methods.bidirectional",
    "pretrain": "cirlab.methods.pretrain",
    "zeroshot": "cirlab.methods.zeroshot",
}
