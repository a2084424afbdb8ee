"""Feature alignment: token relations, the TRD and REPA losses, projectors, grid resampling, hooks."""

from gendistill.core.align.grid import (
    SPATIAL_MODES,
    TEMPORAL_MODES,
    GridAligner,
    grid_to_tokens,
    resample_grid,
    tokens_to_grid,
)
from gendistill.core.align.losses import repa_loss
from gendistill.core.align.projector import Projector
from gendistill.core.align.relations import REDUCTIONS, relation_matrices, trd_loss, trd_loss_reference

from gendistill.core.align.hooks import FeatureHook, block_layout, capture_block, num_blocks, unwrap_model

__all__ = [
    "trd_loss",
    "trd_loss_reference",
    "relation_matrices",
    "REDUCTIONS",
    "repa_loss",
    "Projector",
    "GridAligner",
    "resample_grid",
    "grid_to_tokens",
    "tokens_to_grid",
    "SPATIAL_MODES",
    "TEMPORAL_MODES",
    "FeatureHook",
    "capture_block",
    "block_layout",
    "num_blocks",
    "unwrap_model",
]
