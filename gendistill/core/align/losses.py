"""REPA's representation-alignment loss (Yu et al., arXiv 2410.06940).

TRD (VideoREPA) lives in `relations.py`, beside the relation matrices it is built on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gendistill.core.align.relations import _check_finite, _no_autocast


def repa_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Negative cosine similarity per token, averaged over all tokens (REPA's `proj_loss`).

    Args:
        student: [..., D] projected student tokens, e.g. [B, N, D].
        teacher: [..., D] teacher tokens of the same shape (same width: unlike TRD, REPA compares
            tokens across models, so project the student first).

    Returns:
        [] scalar in [-1, 1], float32 (float64 for float64 inputs). REPA sums the per-sample
        token means and divides by the batch size; with equal token counts that is this mean.
    """
    for name, t in (("student", student), ("teacher", teacher)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a float tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.dim() < 1 or t.numel() == 0:
            raise ValueError(f"{name} must be [..., D] and non-empty, got shape {tuple(t.shape)}")
    if student.shape != teacher.shape:
        if student.shape[-1] != teacher.shape[-1]:
            raise ValueError(
                f"student has width {student.shape[-1]}, teacher {teacher.shape[-1]}: project the student "
                "to the teacher's width first (Projector)"
            )
        raise ValueError(f"student has shape {tuple(student.shape)}, teacher {tuple(teacher.shape)}")
    dtype = torch.promote_types(student.dtype, torch.float32)
    with _no_autocast(student.device):
        s = F.normalize(student.to(dtype), dim=-1)
        t = F.normalize(teacher.to(dtype), dim=-1)
        loss = -(s * t).sum(dim=-1).mean()
    _check_finite(loss, student, teacher, "REPA")
    return loss


__all__ = ["repa_loss"]
