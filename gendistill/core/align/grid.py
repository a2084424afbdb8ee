"""Map a student token grid onto a teacher's token grid (frames x height x width).

VideoREPA (CogVideoX-2B -> VideoMAEv2) aligns 13 x 30 x 45 latent tokens to 24 x 10 x 15
teacher tokens: it drops the first latent frame (the VAE encodes the first video frame
alone), upsamples time 12 -> 24 with trilinear interpolation (scale (2, 1, 1), so linear in
time only) and shrinks space 30 x 45 -> 10 x 15 with a learnable `Conv2d(D, D, kernel_size=3,
stride=3)` applied per frame. Its code hard-codes those sizes; here any frame count and
resolution work:

- `resample_grid` does the parameter-free modes: linear / nearest / area in time, area /
  bilinear / nearest in space.
- `GridAligner` adds the learnable strided conv: the student grid is first resized (bilinear by
  default) to k times the teacher's spatial size, then the k x k, stride-k conv gives exactly
  the teacher's size. When the student is already k times the teacher (30 x 45 -> 10 x 15) the
  resize is skipped and this is VideoREPA's downsampler.

Time and space resampling act on different axes and are linear (interpolation weights sum to
one, so a conv bias passes through), so their order does not change the result; whichever
order has the smaller intermediate grid runs.

Projection to the teacher's width is not done here; see `Projector`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

SPATIAL_MODES = ("area", "bilinear", "nearest")
TEMPORAL_MODES = ("linear", "nearest", "area")
ALIGNER_MODES = ("conv",) + SPATIAL_MODES


def resample_grid(
    grid: torch.Tensor,
    size: Sequence[int],
    *,
    spatial: str = "area",
    temporal: str = "linear",
    drop_first_frame: bool = False,
) -> torch.Tensor:
    """Resample a token grid to another frame count and spatial size.

    Args:
        grid: [B, F, h, w, D] tokens.
        size: (F', h', w') target grid, or a 5-entry teacher shape [B, F', h', w', D'] (B must
            match; D' is ignored).
        spatial: "area" (average pooling over covered cells), "bilinear" (align_corners=False) or
            "nearest".
        temporal: "linear" (align_corners=False, as VideoREPA's trilinear upsampling), "nearest"
            or "area".
        drop_first_frame: drop frame 0 first (the separately encoded first latent frame).

    Returns:
        [B, F', h', w', D] in the input dtype.
    """
    _check_mode("spatial", spatial, SPATIAL_MODES)
    _check_mode("temporal", temporal, TEMPORAL_MODES)
    grid = _prepare(grid, drop_first_frame)
    target = _target_size(size, grid)
    return _resample(grid, target, lambda g: _resize_space(g, target[1:], spatial), temporal)


class GridAligner(ModelMixin, ConfigMixin):
    """Resample student tokens [B, F, h, w, Ds] onto a teacher grid (F', h', w').

    mode "conv" is VideoREPA's learnable downsampler: a k x k, stride-k Conv2d (Ds -> Dt, default
    Dt = Ds, k = 3 as released) applied per frame after resizing the student to k times the
    teacher's spatial size (`resize` mode; skipped when it already is). Modes "area",
    "bilinear", "nearest" have no parameters and keep the width (d_teacher must be None or Ds).
    Time is resampled with `temporal` ("linear" as released). A diffusers model:
    `save_pretrained(folder)` / `GridAligner.from_pretrained(folder)`.
    """

    def __init__(
        self,
        d_student: int,
        d_teacher: int | None = None,
        *,
        mode: str = "conv",
        drop_first_frame: bool = False,
        kernel_size: int | tuple[int, int] = 3,
        temporal: str = "linear",
        resize: str = "bilinear",
    ):
        super().__init__()
        self.register_to_config(d_student=d_student, d_teacher=d_teacher, mode=mode, drop_first_frame=drop_first_frame,
                                kernel_size=kernel_size, temporal=temporal, resize=resize)  # positional arguments too
        _check_mode("mode", mode, ALIGNER_MODES)
        _check_mode("temporal", temporal, TEMPORAL_MODES)
        _check_mode("resize", resize, SPATIAL_MODES)
        d_out = d_student if d_teacher is None else d_teacher
        for name, v in (("d_student", d_student), ("d_teacher", d_out)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if mode != "conv" and d_out != d_student:
            raise ValueError(
                f"mode {mode!r} keeps the width ({d_student}) but d_teacher is {d_out}: "
                "use mode='conv' or project with Projector"
            )
        k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        if len(k) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in k):
            raise ValueError(f"kernel_size must be a positive int or a pair of them, got {kernel_size!r}")
        self.d_student, self.d_teacher, self.mode = d_student, d_out, mode
        self.drop_first_frame, self.temporal, self.resize, self.kernel_size = drop_first_frame, temporal, resize, k
        self.conv = nn.Conv2d(d_student, d_out, kernel_size=k, stride=k) if mode == "conv" else None

    def forward(self, student_grid: torch.Tensor, teacher_grid_shape: Sequence[int]) -> torch.Tensor:
        """student_grid: [B, F, h, w, Ds]; teacher_grid_shape: (F', h', w') or [B, F', h', w', Dt].

        Returns [B, F', h', w', Dt] (Dt = Ds for the parameter-free modes).
        """
        if student_grid.dim() != 5 or student_grid.shape[-1] != self.d_student:
            raise ValueError(
                f"student grid must be [B, F, h, w, {self.d_student}], got shape {tuple(student_grid.shape)}"
            )
        grid = _prepare(student_grid, self.drop_first_frame)
        target = _target_size(teacher_grid_shape, grid)
        if self.conv is None:
            space = lambda g: _resize_space(g, target[1:], self.mode)  # noqa: E731
        else:
            space = lambda g: self._conv_space(g, target[1:])  # noqa: E731
        return _resample(grid, target, space, self.temporal)

    def _conv_space(self, grid: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """[B, F, h, w, Ds] -> [B, F, h', w', Dt]: resize to k*(h', w'), then the strided conv."""
        kh, kw = self.kernel_size
        grid = _resize_space(grid, (hw[0] * kh, hw[1] * kw), self.resize)
        B = grid.shape[0]
        x = rearrange(grid, "b f h w d -> (b f) d h w")
        x = self.conv(x)
        return rearrange(x, "(b f) d h w -> b f h w d", b=B)

    def extra_repr(self) -> str:
        return (
            f"d_student={self.d_student}, d_teacher={self.d_teacher}, mode={self.mode!r}, "
            f"drop_first_frame={self.drop_first_frame}, temporal={self.temporal!r}"
        )


def grid_to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """[B, F, h, w, D] -> [B, F, h*w, D], the per-frame token layout `trd_loss` takes."""
    if grid.dim() != 5:
        raise ValueError(f"grid must be [B, F, h, w, D], got shape {tuple(grid.shape)}")
    return rearrange(grid, "b f h w d -> b f (h w) d")


def tokens_to_grid(tokens: torch.Tensor, grid_size: Sequence[int]) -> torch.Tensor:
    """[B, F*h*w, D] (frame-major, then row-major; a DiT's video tokens) -> [B, F, h, w, D]."""
    if len(grid_size) != 3:
        raise ValueError(f"grid_size must be (F, h, w), got {tuple(grid_size)}")
    f, h, w = (int(v) for v in grid_size)
    if tokens.dim() != 3 or tokens.shape[1] != f * h * w:
        raise ValueError(
            f"tokens must be [B, {f}*{h}*{w}={f * h * w}, D] for grid {(f, h, w)}, got shape {tuple(tokens.shape)}"
        )
    return rearrange(tokens, "b (f h w) d -> b f h w d", f=f, h=h, w=w)


# ----------------------------------------------------------------------------- internals


def _check_mode(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _prepare(grid: torch.Tensor, drop_first_frame: bool) -> torch.Tensor:
    """Validate a [B, F, h, w, D] grid and drop frame 0 if asked."""
    if not isinstance(grid, torch.Tensor) or grid.dim() != 5:
        raise ValueError(f"grid must be [B, F, h, w, D], got shape {tuple(getattr(grid, 'shape', ()))}")
    if not grid.is_floating_point():
        raise ValueError(f"grid must be a float tensor, got {grid.dtype}")
    if grid.numel() == 0:
        raise ValueError(f"grid is empty: shape {tuple(grid.shape)}")
    if drop_first_frame:
        if grid.shape[1] < 2:
            raise ValueError(f"drop_first_frame needs at least 2 frames, the student grid has {grid.shape[1]}")
        grid = grid[:, 1:]
    return grid


def _target_size(size: Sequence[int], grid: torch.Tensor) -> tuple[int, int, int]:
    """(F', h', w') from a 3-entry size or a 5-entry teacher shape (batch checked)."""
    size = tuple(size)
    if len(size) == 5:
        if int(size[0]) != grid.shape[0]:
            raise ValueError(f"student grid has batch size {grid.shape[0]}, teacher {int(size[0])}")
        size = size[1:4]
    if len(size) != 3:
        raise ValueError(f"teacher grid shape must be (F, h, w) or [B, F, h, w, D], got {size}")
    if any(isinstance(v, bool) or int(v) != v or int(v) < 1 for v in size):
        raise ValueError(f"teacher grid sizes must be positive ints, got {size}")
    return int(size[0]), int(size[1]), int(size[2])


def _resample(grid: torch.Tensor, target: tuple[int, int, int], space, temporal: str) -> torch.Tensor:
    """Apply `space` ([B, F, h, w, D] -> [B, F, h', w', D']) and time resampling, cheaper order first."""
    B, F_in, h, w, _ = grid.shape
    F_out, h_out, w_out = target
    if F_out * h * w < F_in * h_out * w_out:
        return space(_resize_time(grid, F_out, temporal))
    return _resize_time(space(grid), F_out, temporal)


def _resize_space(grid: torch.Tensor, hw: tuple[int, int], mode: str) -> torch.Tensor:
    """[B, F, h, w, D] -> [B, F, h', w', D] per frame."""
    if tuple(grid.shape[2:4]) == tuple(hw):
        return grid
    B = grid.shape[0]
    x = rearrange(grid, "b f h w d -> (b f) d h w")
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    x = F.interpolate(x, size=tuple(hw), mode=mode, **kwargs)
    return rearrange(x, "(b f) d h w -> b f h w d", b=B)


def _resize_time(grid: torch.Tensor, frames: int, mode: str) -> torch.Tensor:
    """[B, F, h, w, D] -> [B, F', h, w, D] along frames."""
    B, F_in, h, w, D = grid.shape
    if F_in == frames:
        return grid
    x = rearrange(grid, "b f h w d -> b (h w d) f")
    kwargs = {"align_corners": False} if mode == "linear" else {}
    x = F.interpolate(x, size=frames, mode=mode, **kwargs)
    return rearrange(x, "b (h w d) f -> b f h w d", h=h, w=w)


__all__ = ["resample_grid", "GridAligner", "grid_to_tokens", "tokens_to_grid", "SPATIAL_MODES", "TEMPORAL_MODES"]
