"""VideoREPA: token relation distillation from a frozen video teacher into a video diffusion transformer."""

from gendistill.video_distill.teachers import (
    TEACHERS,
    DINOv2Teacher,
    VideoMAETeacher,
    VideoMAEv2Teacher,
    VideoTeacher,
    VJEPA2Teacher,
    load_teacher,
    preprocess_video,
)

__all__ = [
    "TEACHERS",
    "DINOv2Teacher",
    "VideoMAETeacher",
    "VideoMAEv2Teacher",
    "VideoTeacher",
    "VJEPA2Teacher",
    "load_teacher",
    "preprocess_video",
]
