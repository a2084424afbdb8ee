"""The REPA / VideoREPA projection head."""

from __future__ import annotations

import torch
from torch import nn


class Projector(nn.Sequential):
    """MLP Linear(d_in, hidden) -> SiLU -> Linear(hidden, hidden) -> SiLU -> Linear(hidden, d_out).

    The layout (and so the state_dict keys "0.*", "2.*", "4.*") is REPA's and VideoREPA's
    `build_mlp`, so their projector weights load directly. Maps [..., d_in] -> [..., d_out].
    """

    def __init__(self, d_in: int, d_out: int, hidden: int = 2048):
        for name, v in (("d_in", d_in), ("d_out", d_out), ("hidden", hidden)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        super().__init__(
            nn.Linear(d_in, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, d_out),
        )
        self.d_in, self.d_out, self.hidden = d_in, d_out, hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., d_in] -> [..., d_out]."""
        if x.dim() < 1 or x.shape[-1] != self.d_in:
            raise ValueError(f"Projector expects [..., {self.d_in}] features, got shape {tuple(x.shape)}")
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, hidden={self.hidden}, d_out={self.d_out}"


__all__ = ["Projector"]
