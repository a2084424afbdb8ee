"""RoMaP part editing of Gaussian-splat scenes: label field (3D-GALP), part masks, SLaMP, the editor.

Names are imported lazily, so that `gendistill <command>` starts without importing diffusers.
"""

import importlib

_EXPORTS = {
    "SLaMPConfig": "slamp",
    "SLaMPResult": "slamp",
    "slamp_edit": "slamp",
    "mix_latents": "slamp",
    "mixing_weight": "slamp",
    "run_edit": "editor",
    "PartEditor": "editor",
    "load_edit_config": "edit_config",
    "GALPConfig": "galp",
    "LabelField": "galp",
    "train_label_field": "galp",
    "masks_from_scene": "galp",
    "vote_masks": "galp",
    "get_part_masks": "part_masks",
    "MASK_SOURCES": "part_masks",
    "segment": "segment",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"gendistill.splat_edit.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
