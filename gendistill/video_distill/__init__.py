"""VideoREPA: token relation distillation from a frozen video teacher into a video diffusion transformer.

The teacher API is re-exported lazily, so that `gendistill <command>` starts without importing transformers.
"""

__all__ = [
    "TEACHERS",
    "DINOv2Teacher",
    "VideoMAETeacher",
    "VideoMAEv2Teacher",
    "VideoTeacher",
    "VJEPA2Teacher",
    "VJEPATeacher",
    "OmniMAETeacher",
    "load_teacher",
    "preprocess_video",
]


def __getattr__(name: str):
    if name in __all__:
        from gendistill.video_distill import teachers

        return getattr(teachers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
