"""RoMaP part editing of Gaussian-splat scenes: label field (3D-GALP), part masks, SLaMP, the editor."""

from gendistill.splat_edit.slamp import (
    SLaMPConfig,
    SLaMPResult,
    mix_latents,
    mixing_weight,
    slamp_edit,
)

# --- other splat_edit modules (galp.py, masks, editor.py) ---
# The lead adds their public names here and to __all__ below.
# --- end other modules ---

__all__ = [
    "SLaMPConfig",
    "SLaMPResult",
    "slamp_edit",
    "mix_latents",
    "mixing_weight",
]
