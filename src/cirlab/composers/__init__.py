"""Composers: trained CIR models as objects (see :mod:`cirlab.composers.base`).

``cirlab.load(path)`` reads any exported model folder back into its composer."""

from .base import (BACKWARD, FORWARD, REGISTRY, Composer, QueryRecipe, load, read_manifest, register,
                   with_direction)
from .fusion import CombinerComposer, SumComposer
from .grounded import GroundedComposer, RerankComposer
from .projection import ProjectionComposer
from .zeroshot import MODES, ZeroShotComposer

__all__ = ["BACKWARD", "FORWARD", "MODES", "REGISTRY", "CombinerComposer", "Composer", "GroundedComposer",
           "ProjectionComposer", "QueryRecipe", "RerankComposer", "SumComposer", "ZeroShotComposer", "load", "read_manifest",
           "register", "with_direction"]
