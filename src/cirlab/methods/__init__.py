"""Methods: each is a module over the one training engine, its stages registered where they are
defined (:func:`cirlab.methods.stages.register_stage`): the stage's config model, what it produces
(a trained model, a backbone, untrained composers to evaluate, files) and the function that builds
or runs it. ``cirlab train`` and ``cirlab eval --config`` ask the registry; nothing lists the methods."""

from cirlab.methods.stages import StageSpec, build_stage, register_stage, spec_of

__all__ = ["StageSpec", "build_stage", "register_stage", "spec_of"]
