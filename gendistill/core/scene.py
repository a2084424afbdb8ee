"""GaussianScene: raw 3D Gaussian-splat parameters; files of every format through `load` and `save`.

The parameters are the raw (pre-activation) ones of the INRIA 3DGS PLY, the layout every tool
shares (`gendistill.core.formats.ply`); the other formats are in `gendistill.core.formats`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from gendistill.core.render.sh import num_sh_bases, rgb_to_sh, sh_degree_from_bases, sh_to_rgb

__all__ = ["GaussianScene", "SceneFormatError"]

_REQUIRED = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
             "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
_NORMALS = ["nx", "ny", "nz"]
# INRIA's loader collects properties by these prefixes, so no extra may start with them
_RESERVED_PREFIXES = ("f_dc_", "f_rest_", "scale_", "rot_", "obj_dc_", "obj_rest_")


class SceneFormatError(ValueError):
    """A file that is not a readable scene; the message names the file and the problem."""


@dataclass
class GaussianScene:
    """N Gaussians with raw (pre-activation) parameters, as stored in INRIA 3DGS PLY files.

    Attributes:
        means: [N, 3] centres.
        quats: [N, 4] rotations, wxyz, not necessarily normalized.
        log_scales: [N, 3] log of the standard deviations along the local axes.
        opacity_logits: [N] inverse-sigmoid opacities.
        sh: [N, K, 3] colour SH coefficients, K = (degree + 1) ** 2; sh[:, 0] is `f_dc_*`.
        label_sh: [N, K', 3] optional RoMaP label-field SH (`obj_dc_*`, `obj_rest_*`), its own degree.
        certainty: [N] optional RoMaP certainty.
        extras: name -> [N] tensor, any other per-vertex property (kept on round trip).
        comments: PLY header comments (no newlines); `key: value` ones are `metadata()`.
    """

    means: torch.Tensor
    quats: torch.Tensor
    log_scales: torch.Tensor
    opacity_logits: torch.Tensor
    sh: torch.Tensor
    label_sh: torch.Tensor | None = None
    certainty: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    comments: list[str] = field(default_factory=list)

    def __post_init__(self):
        n = self.means.shape[0]
        shapes = {"means": (n, 3), "quats": (n, 4), "log_scales": (n, 3), "opacity_logits": (n,)}
        for name, shape in shapes.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"GaussianScene.{name} must be {list(shape)}, got {list(getattr(self, name).shape)}")
        for name in ("sh", "label_sh"):
            t = getattr(self, name)
            if t is None:
                continue
            if t.ndim != 3 or t.shape[0] != n or t.shape[2] != 3:
                raise ValueError(f"GaussianScene.{name} must be [N={n}, K, 3], got {list(t.shape)}")
            sh_degree_from_bases(t.shape[1])
        if self.certainty is not None and tuple(self.certainty.shape) != (n,):
            raise ValueError(f"GaussianScene.certainty must be [{n}], got {list(self.certainty.shape)}")
        for key, t in self.extras.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"extra property name {key!r} is not a valid PLY property name")
            if tuple(t.shape) != (n,):
                raise ValueError(f"extra property {key!r} must be [{n}], got {list(t.shape)}")
            if key.startswith(_RESERVED_PREFIXES) or key in _REQUIRED + _NORMALS + ["certainty"]:
                raise ValueError(f"extra property name {key!r} is reserved for 3DGS / RoMaP properties")
        self.comments = [str(c) for c in self.comments]
        for c in self.comments:
            if "\n" in c or "\r" in c:
                raise ValueError(f"PLY comments cannot contain newlines: {c!r}")

    # ------------------------------------------------------------------ sizes and activated views
    @property
    def num_gaussians(self) -> int:
        return self.means.shape[0]

    def __len__(self) -> int:
        return self.means.shape[0]

    @property
    def sh_degree(self) -> int:
        """Degree (0..3) of the colour SH."""
        return sh_degree_from_bases(self.sh.shape[1])

    @property
    def label_sh_degree(self) -> int | None:
        return None if self.label_sh is None else sh_degree_from_bases(self.label_sh.shape[1])

    @property
    def device(self) -> torch.device:
        return self.means.device

    def scales(self) -> torch.Tensor:
        """[N, 3] standard deviations, exp(log_scales)."""
        return self.log_scales.exp()

    def opacities(self) -> torch.Tensor:
        """[N] opacities in (0, 1), sigmoid(opacity_logits)."""
        return torch.sigmoid(self.opacity_logits)

    def normalized_quats(self) -> torch.Tensor:
        """[N, 4] unit wxyz quaternions."""
        return torch.nn.functional.normalize(self.quats, dim=-1)

    def colors_rgb(self) -> torch.Tensor:
        """[N, 3] the view-independent (DC) colour as RGB, clamped to [0, 1]."""
        return sh_to_rgb(self.sh[:, 0]).clamp(0.0, 1.0)

    def render_args(self) -> dict[str, Any]:
        """Activated tensors as `rasterize` takes them: means, quats, scales, opacities, colors, sh_degree.

        Use as `rasterize(**scene.render_args(), viewmats=..., Ks=..., width=..., height=...)`.
        """
        return {"means": self.means, "quats": self.quats, "scales": self.scales(),
                "opacities": self.opacities(), "colors": self.sh, "sh_degree": self.sh_degree}

    def render(self, cameras, **kwargs):
        """Render a `Cameras` batch with `gendistill.core.render.rasterize`; kwargs go to it.

        Returns (render [C, H, W, D], alphas [C, H, W, 1], meta).
        """
        from gendistill.core.render import rasterize

        cameras = cameras.to(self.device)
        return rasterize(**self.render_args(), viewmats=cameras.viewmats.to(self.means.dtype),
                         Ks=cameras.Ks.to(self.means.dtype), width=cameras.width,
                         height=cameras.height, **kwargs)

    # ------------------------------------------------------------------ geometry
    def bbox(self, quantile: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Axis-aligned bounds of the means: (min [3], max [3]); `quantile` > 0 ignores outliers."""
        if len(self) == 0:
            raise ValueError("bbox of an empty scene")
        if quantile > 0:
            q = torch.tensor([quantile, 1.0 - quantile], dtype=self.means.dtype, device=self.device)
            lo, hi = torch.quantile(self.means.float(), q.float(), dim=0).to(self.means.dtype)
            return lo, hi
        return self.means.amin(dim=0), self.means.amax(dim=0)

    def center(self, quantile: float = 0.0) -> torch.Tensor:
        """[3] midpoint of `bbox(quantile)`."""
        lo, hi = self.bbox(quantile)
        return (lo + hi) / 2

    def metadata(self) -> dict[str, str]:
        """Comments of the form `key: value` as a dict (later ones win)."""
        out = {}
        for c in self.comments:
            key, sep, value = c.partition(":")
            if sep and key.strip() and " " not in key.strip():
                out[key.strip()] = value.strip()
        return out

    # ------------------------------------------------------------------ tensor plumbing
    def _per_vertex(self) -> dict[str, torch.Tensor | None]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extras", "comments")}

    def _map(self, fn) -> "GaussianScene":
        kw = {k: (None if v is None else fn(k, v)) for k, v in self._per_vertex().items()}
        extras = {k: fn(k, v) for k, v in self.extras.items()}
        return GaussianScene(**kw, extras=extras, comments=list(self.comments))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "GaussianScene":
        """Move every tensor to `device`; `dtype` applies to the float parameters (extras keep theirs
        unless they are floating point)."""
        def move(_, t):
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return self._map(move)

    def detach(self) -> "GaussianScene":
        return self._map(lambda _, t: t.detach())

    def clone(self) -> "GaussianScene":
        return self._map(lambda _, t: t.clone())

    def subset(self, index: torch.Tensor | np.ndarray | Sequence[int] | slice) -> "GaussianScene":
        """The Gaussians selected by a [N] bool mask, an index array or a slice."""
        if not isinstance(index, slice):
            index = torch.as_tensor(np.asarray(index) if not torch.is_tensor(index) else index)
            if index.dtype == torch.bool and index.shape != (len(self),):
                raise ValueError(f"mask must be [{len(self)}], got {list(index.shape)}")
            index = index.to(self.device)
        return self._map(lambda _, t: t[index])

    @staticmethod
    def concat(scenes: Sequence["GaussianScene"]) -> "GaussianScene":
        """Concatenate scenes. Lower SH degrees are zero-padded to the highest; label_sh, certainty
        and each extra must be present in all scenes or in none; comments are merged in order."""
        scenes = list(scenes)
        if not scenes:
            raise ValueError("concat needs at least one scene")

        def pad(t: torch.Tensor, k: int) -> torch.Tensor:
            return torch.cat([t, t.new_zeros(t.shape[0], k - t.shape[1], 3)], dim=1) if t.shape[1] < k else t

        kw = {}
        for name in ("means", "quats", "log_scales", "opacity_logits"):
            kw[name] = torch.cat([getattr(s, name) for s in scenes])
        k = max(s.sh.shape[1] for s in scenes)
        kw["sh"] = torch.cat([pad(s.sh, k) for s in scenes])
        for name in ("label_sh", "certainty"):
            present = [getattr(s, name) is not None for s in scenes]
            if any(present) and not all(present):
                raise ValueError(f"concat: {name} is present in some scenes but not in others")
            if all(present):
                ts = [getattr(s, name) for s in scenes]
                if name == "label_sh":
                    kl = max(t.shape[1] for t in ts)
                    ts = [pad(t, kl) for t in ts]
                kw[name] = torch.cat(ts)
        keys = list(scenes[0].extras)
        for s in scenes[1:]:
            if set(s.extras) != set(keys):
                raise ValueError(f"concat: extras differ ({sorted(keys)} vs {sorted(s.extras)})")
        extras = {key: torch.cat([s.extras[key] for s in scenes]) for key in keys}
        comments = list(dict.fromkeys(c for s in scenes for c in s.comments))
        return GaussianScene(**kw, extras=extras, comments=comments)

    # ------------------------------------------------------------------ construction
    @staticmethod
    def from_points(points: torch.Tensor | np.ndarray, colors: torch.Tensor | np.ndarray | None = None, *,
                    sh_degree: int = 3, init_opacity: float = 0.1, init_scale: float = 1.0) -> "GaussianScene":
        """Gaussians initialised from a point cloud as 3DGS does.

        Scale: log(init_scale * sqrt(mean squared distance to the 3 nearest neighbours)) on all
        three axes (squared distance clamped at 1e-7); identity rotations; opacity logit of
        `init_opacity`; DC from `colors`, higher SH coefficients zero.

        Args:
            points: [N, 3], N >= 2.
            colors: [N, 3] floats in [0, 1] or uint8 in [0, 255]; grey (0.5) if None.
        """
        from scipy.spatial import cKDTree

        pts = torch.as_tensor(np.asarray(points) if not torch.is_tensor(points) else points).detach()
        if pts.ndim != 2 or pts.shape[1] != 3:
            raise ValueError(f"points must be [N, 3], got {list(pts.shape)}")
        n = pts.shape[0]
        if n < 2:
            raise ValueError(f"from_points needs at least 2 points to set scales, got {n}")
        if not 0.0 < init_opacity < 1.0:
            raise ValueError(f"init_opacity must be in (0, 1), got {init_opacity}")
        pts = pts.float().cpu()
        if colors is None:
            rgb = torch.full((n, 3), 0.5)
        else:
            c = torch.as_tensor(np.asarray(colors) if not torch.is_tensor(colors) else colors).detach().cpu()
            if tuple(c.shape) != (n, 3):
                raise ValueError(f"colors must be [{n}, 3], got {list(c.shape)}")
            rgb = c.float() / 255.0 if c.dtype == torch.uint8 else c.float()
        k = min(3, n - 1)
        dist, _ = cKDTree(pts.numpy().astype(np.float64)).query(pts.numpy().astype(np.float64), k=k + 1)
        dist2 = np.clip((dist[:, 1:] ** 2).mean(axis=1), 1e-7, None)
        log_scale = torch.from_numpy(np.log(init_scale * np.sqrt(dist2))).float()
        sh = torch.zeros(n, num_sh_bases(sh_degree), 3)
        sh[:, 0] = rgb_to_sh(rgb)
        quats = torch.zeros(n, 4)
        quats[:, 0] = 1.0
        logit = math.log(init_opacity / (1.0 - init_opacity))
        return GaussianScene(means=pts.clone(), quats=quats, log_scales=log_scale[:, None].repeat(1, 3),
                             opacity_logits=torch.full((n,), logit), sh=sh)

    def with_sh_degree(self, degree: int) -> "GaussianScene":
        """The scene with colour SH of `degree` (0-3): higher orders dropped, missing ones zero."""
        k, n = num_sh_bases(degree), len(self)
        sh = self.sh[:, :k] if k <= self.sh.shape[1] else torch.cat(
            [self.sh, self.sh.new_zeros(n, k - self.sh.shape[1], 3)], dim=1)
        return replace(self, sh=sh.clone())

    # ------------------------------------------------------------------ files
    @staticmethod
    def load(path: str | os.PathLike, fmt: str | None = None) -> "GaussianScene":
        """Read a scene file of any supported format, found from the file itself (or named by `fmt`).

        Formats: INRIA PLY, compressed PLY (SuperSplat / PlayCanvas), `.splat`, `.spz`, gsplat
        checkpoints (`gendistill.core.formats.SCENE_FORMATS`). What a format could not hold
        exactly (quantisation, SH orders it lacks) is logged as a warning naming the file.
        """
        from gendistill.core.formats import read_scene

        return read_scene(path, fmt)[0]

    def save(self, path: str | os.PathLike, fmt: str | None = None) -> Path:
        """Write the scene in the format named by `fmt` or by the path's suffix, atomically."""
        from gendistill.core.formats import write_scene

        write_scene(self, path, fmt)
        return Path(path)

    @staticmethod
    def load_ply(path: str | os.PathLike) -> "GaussianScene":
        """Read an INRIA 3DGS PLY (`gendistill.core.formats.ply.read_ply`)."""
        from gendistill.core.formats.ply import read_ply

        return read_ply(path)

    def save_ply(self, path: str | os.PathLike) -> Path:
        """Write INRIA 3DGS binary little-endian PLY, atomically (`gendistill.core.formats.ply.write_ply`)."""
        from gendistill.core.formats.ply import write_ply

        return write_ply(self, path)
