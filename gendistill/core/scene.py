"""GaussianScene: raw 3D Gaussian-splat parameters, and INRIA 3DGS PLY reading and writing.

The PLY layout is the one of the INRIA code (`GaussianModel.save_ply`): one `vertex` element,
binary little-endian float32 properties in the order

    x y z nx ny nz f_dc_0 f_dc_1 f_dc_2 f_rest_0 .. f_rest_{3(K-1)-1} opacity scale_0..2 rot_0..3

with `f_rest_*` channel-major (all higher-order coefficients of R, then of G, then of B),
`opacity` a logit, `scale_*` logs, `rot_*` a raw wxyz quaternion. RoMaP's label field
(`obj_dc_*`, `obj_rest_*`, same layout, its own degree) and `certainty` follow, then any other
per-vertex property (`extras`, e.g. the demo scene's integer `part`). Header comments are kept
(`comments`); comments of the form `key: value` read back as `metadata()`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from plyfile import PlyData, PlyElement

from gendistill.core.io import atomic_path
from gendistill.core.render.sh import num_sh_bases, rgb_to_sh, sh_degree_from_bases, sh_to_rgb

__all__ = ["GaussianScene", "SceneFormatError"]

_REQUIRED = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
             "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
_NORMALS = ["nx", "ny", "nz"]
# INRIA's loader collects properties by these prefixes, so no extra may start with them
_RESERVED_PREFIXES = ("f_dc_", "f_rest_", "scale_", "rot_", "obj_dc_", "obj_rest_")
_REST_COUNTS = {0: 0, 9: 1, 24: 2, 45: 3}  # number of f_rest_* -> SH degree
# numpy dtype kind+size -> PLY type written for extras; int64/uint64 are narrowed (range-checked)
_EXTRA_DTYPES = {"u1": "u1", "i1": "i1", "u2": "u2", "i2": "i2", "u4": "u4", "i4": "i4",
                 "i8": "i4", "u8": "u4", "b1": "u1", "f2": "f4", "f4": "f4", "f8": "f8"}
# numpy dtype read from a file -> torch dtype (torch lacks wide unsigned ints: widen)
_TORCH_FROM_NP = {"u1": torch.uint8, "i1": torch.int8, "u2": torch.int32, "i2": torch.int16,
                  "u4": torch.int64, "i4": torch.int32, "f4": torch.float32, "f8": torch.float64}


class SceneFormatError(ValueError):
    """A PLY file that is not a readable 3DGS scene; the message names the file and the problem."""


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

    # ------------------------------------------------------------------ PLY
    @staticmethod
    def load_ply(path: str | os.PathLike) -> "GaussianScene":
        """Read an INRIA 3DGS PLY (binary or ASCII; written by INRIA's code, gsplat, SuperSplat, RoMaP).

        Raises `SceneFormatError` naming the file and the problem: not a PLY, truncated, no
        `vertex` element, a missing required property, an f_rest_* count other than 0/9/24/45,
        NaN or Inf values.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such scene file")
        try:
            ply = PlyData.read(str(path))
        except Exception as e:  # plyfile raises several types for header / body problems
            msg = str(e)
            if "expected 'ply'" in msg:
                problem = "not a PLY file (it does not start with 'ply')"
            elif "end-of-file" in msg and type(e).__name__ == "PlyElementParseError":
                problem = f"truncated file ({msg})"
            else:
                problem = f"unreadable PLY ({type(e).__name__}: {msg})"
            raise SceneFormatError(f"{path}: {problem}") from None
        if "vertex" not in ply:
            names = [el.name for el in ply.elements]
            raise SceneFormatError(f"{path}: no 'vertex' element (elements: {names})")
        data = ply["vertex"].data
        present = list(data.dtype.names or ())
        if "packed_position" in present or "chunk" in ply:
            raise SceneFormatError(f"{path}: a compressed (SuperSplat / PlayCanvas) PLY; export it uncompressed")
        for name in _REQUIRED:
            if name not in present:
                raise SceneFormatError(f"{path}: required vertex property '{name}' is missing "
                                       f"(found: {' '.join(present)})")
        n = len(data)

        def numbered(prefix: str) -> list[str]:
            found = sorted((int(m.group(1)), p) for p in present if (m := re.fullmatch(prefix + r"_(\d+)", p)))
            idx = [i for i, _ in found]
            if idx != list(range(len(idx))):
                raise SceneFormatError(f"{path}: properties {prefix}_* are not numbered 0..{len(idx) - 1} ({idx})")
            return [p for _, p in found]

        def floats(names: list[str]) -> np.ndarray:
            out = np.empty((n, len(names)), dtype=np.float32)
            for j, name in enumerate(names):
                col = np.asarray(data[name])
                if col.dtype.kind not in "fiu":
                    raise SceneFormatError(f"{path}: property '{name}' has non-numeric type {col.dtype}")
                out[:, j] = col
                if not np.isfinite(out[:, j]).all():
                    bad = int((~np.isfinite(out[:, j])).sum())
                    raise SceneFormatError(f"{path}: property '{name}' has {bad} NaN/Inf value(s)")
            return out

        def sh_block(dc_prefix: str, rest_prefix: str) -> torch.Tensor:
            rest = numbered(rest_prefix)
            if len(rest) not in _REST_COUNTS:
                raise SceneFormatError(f"{path}: {len(rest)} {rest_prefix}_* properties; an SH degree 0-3 "
                                       f"layout has 0, 9, 24 or 45")
            k = len(rest) // 3 + 1
            dc = floats([f"{dc_prefix}_{i}" for i in range(3)])  # [N, 3]
            r = floats(rest).reshape(n, 3, k - 1).transpose(0, 2, 1)  # channel-major -> [N, K-1, 3]
            return torch.from_numpy(np.ascontiguousarray(np.concatenate([dc[:, None], r], axis=1)))

        known = set(_REQUIRED) | set(_NORMALS)
        means = torch.from_numpy(floats(["x", "y", "z"]))
        sh = sh_block("f_dc", "f_rest")
        known |= {p for p in present if p.startswith("f_rest_")}
        label_sh = None
        if any(p.startswith("obj_dc_") or p.startswith("obj_rest_") for p in present):
            for name in ("obj_dc_0", "obj_dc_1", "obj_dc_2"):
                if name not in present:
                    raise SceneFormatError(f"{path}: label field property '{name}' is missing")
            label_sh = sh_block("obj_dc", "obj_rest")
            known |= {p for p in present if p.startswith("obj_dc_") or p.startswith("obj_rest_")}
        certainty = None
        if "certainty" in present:
            certainty = torch.from_numpy(floats(["certainty"])[:, 0].copy())
            known.add("certainty")
        extras = {}
        for name in present:
            if name in known:
                continue
            if name.startswith(_RESERVED_PREFIXES) or name == "certainty":
                raise SceneFormatError(f"{path}: unexpected property '{name}' (not part of the 3DGS layout)")
            col = np.asarray(data[name])
            if col.dtype.kind not in "fiu":
                raise SceneFormatError(f"{path}: property '{name}' is a list or non-numeric ({col.dtype}); "
                                       "only scalar per-vertex properties are supported")
            key = col.dtype.kind + str(col.dtype.itemsize)
            t = torch.from_numpy(np.ascontiguousarray(col.astype(col.dtype.newbyteorder("="))))
            extras[name] = t.to(_TORCH_FROM_NP.get(key, torch.float32))
        return GaussianScene(
            means=means,
            quats=torch.from_numpy(floats([f"rot_{i}" for i in range(4)])),
            log_scales=torch.from_numpy(floats([f"scale_{i}" for i in range(3)])),
            opacity_logits=torch.from_numpy(floats(["opacity"])[:, 0].copy()),
            sh=sh, label_sh=label_sh, certainty=certainty, extras=extras,
            comments=list(ply.comments),
        )

    def save_ply(self, path: str | os.PathLike) -> Path:
        """Write INRIA 3DGS binary little-endian PLY, atomically; returns the path.

        Normals are written as zeros. Label SH, certainty and extras follow the INRIA properties.
        NaN / inf values are refused (ValueError naming the properties) before anything is written.
        """
        path = Path(path)
        n = len(self)

        def np32(t: torch.Tensor) -> np.ndarray:
            return t.detach().to("cpu", torch.float32).numpy().reshape(n, -1)

        def rest_cols(sh: torch.Tensor) -> np.ndarray:  # [N, K, 3] -> channel-major [N, 3(K-1)]
            return np32(sh[:, 1:].transpose(1, 2))

        columns: list[tuple[str, np.ndarray]] = []
        add = lambda names, arr: columns.extend(zip(names, arr.T))  # noqa: E731
        add(["x", "y", "z"], np32(self.means))
        add(_NORMALS, np.zeros((n, 3), np.float32))
        add([f"f_dc_{i}" for i in range(3)], np32(self.sh[:, 0]))
        add([f"f_rest_{i}" for i in range(3 * (self.sh.shape[1] - 1))], rest_cols(self.sh))
        add(["opacity"], np32(self.opacity_logits))
        add([f"scale_{i}" for i in range(3)], np32(self.log_scales))
        add([f"rot_{i}" for i in range(4)], np32(self.quats))
        if self.label_sh is not None:
            add([f"obj_dc_{i}" for i in range(3)], np32(self.label_sh[:, 0]))
            add([f"obj_rest_{i}" for i in range(3 * (self.label_sh.shape[1] - 1))], rest_cols(self.label_sh))
        if self.certainty is not None:
            add(["certainty"], np32(self.certainty))
        taken = {name for name, _ in columns}
        for key, t in self.extras.items():
            if key in taken:
                raise ValueError(f"extra property {key!r} clashes with a 3DGS property")
            arr = t.detach().cpu().numpy()
            kind = arr.dtype.kind + str(arr.dtype.itemsize)
            target = np.dtype(_EXTRA_DTYPES.get(kind, "f4"))
            if target.kind in "iu" and arr.size:
                info = np.iinfo(target)
                if arr.min() < info.min or arr.max() > info.max:
                    raise ValueError(f"extra property {key!r} has values outside the range of PLY type {target}")
            columns.append((key, arr.astype(target)))
        bad = {name: int((~np.isfinite(col)).sum()) for name, col in columns if col.dtype.kind == "f"}
        bad = {name: count for name, count in bad.items() if count}
        if bad:  # load_ply refuses them: never write a file our own reader rejects
            raise ValueError(f"{path}: not written, NaN/inf values in " + ", ".join(f"{k} ({v})" for k, v in bad.items()))
        data = np.empty(n, dtype=[(name, col.dtype.newbyteorder("<")) for name, col in columns])
        for name, col in columns:
            data[name] = col
        el = PlyElement.describe(data, "vertex")
        ply = PlyData([el], text=False, byte_order="<", comments=list(self.comments))
        with atomic_path(path) as tmp:
            ply.write(str(tmp))
        return path
