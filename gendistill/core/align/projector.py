"""The REPA / VideoREPA projection head."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class Projector(ModelMixin, ConfigMixin):
    """MLP Linear(d_in, hidden) -> SiLU -> Linear(hidden, hidden) -> SiLU -> Linear(hidden, d_out).

    The layout (and so the state_dict keys "0.*", "2.*", "4.*") is REPA's and VideoREPA's
    `build_mlp`, so their projector weights load directly. Maps [..., d_in] -> [..., d_out].
    A diffusers model: `save_pretrained(folder)` / `Projector.from_pretrained(folder)`.
    """

    def __init__(self, d_in: int, d_out: int, hidden: int = 2048):
        super().__init__()
        self.register_to_config(d_in=d_in, d_out=d_out, hidden=hidden)  # positional arguments too
        for name, v in (("d_in", d_in), ("d_out", d_out), ("hidden", hidden)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        layers = (nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, d_out))
        for i, layer in enumerate(layers):
            self.add_module(str(i), layer)
        self.d_in, self.d_out, self.hidden = d_in, d_out, hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., d_in] -> [..., d_out]."""
        if x.dim() < 1 or x.shape[-1] != self.d_in:
            raise ValueError(f"Projector expects [..., {self.d_in}] features, got shape {tuple(x.shape)}")
        for layer in self.children():
            x = layer(x)
        return x

    def __getitem__(self, i: int) -> nn.Module:
        """Layer i (0, 2, 4: Linear; 1, 3: SiLU), as in an nn.Sequential."""
        return self.get_submodule(str(i))

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, hidden={self.hidden}, d_out={self.d_out}"


__all__ = ["Projector"]
