"""Methods: each is a module over the one training engine, configured by the ``method`` section.

``METHODS`` maps a config's ``method.name`` to the module that implements it; a module offers
``build(cfg) -> (model, train_data, evaluate)`` for training and the functions its CLI needs.
"""

METHODS = {
    "pretrain": "cirlab.methods.pretrain",
}
