"""Metrics, each benchmark's evaluation protocol, and prediction files (submissions)."""

from cirlab.evaluation.protocols import (
    chance_levels,
    combine_splits,
    evaluate_rankings,
    evaluate_similarity,
)
from cirlab.evaluation.submission import (
    rankings_from_similarity,
    read_predictions,
    write_circo_submission,
    write_cirr_submission,
    write_fashioniq_predictions,
)

__all__ = [
    "chance_levels",
    "combine_splits",
    "evaluate_rankings",
    "evaluate_similarity",
    "rankings_from_similarity",
    "read_predictions",
    "write_circo_submission",
    "write_cirr_submission",
    "write_fashioniq_predictions",
]
