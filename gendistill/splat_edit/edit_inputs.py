"""Inputs of `gendistill edit`: file checks, the scene, cameras (file or orbit ring), the part's 3D
mask (mask file, 3D-GALP label field, integer part property, or 3D-GALP trained here), the guidance.

Everything here fails with one clear error naming the config key or the part, and runs before any
long work (model loading, 3D-GALP training, SLaMP, optimisation).
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gendistill.core.architectures import arch_folder, is_random
from gendistill.core.cameras import Cameras, load_cameras, orbit_path
from gendistill.core.scene import GaussianScene
from gendistill.splat_edit.edit_config import EditConfig, GuidanceConfig

__all__ = [
    "check_inputs", "load_scene", "resolve_ring", "estimate_up", "make_cameras", "scene_radius", "camera_angles",
    "visible_gaussians", "part_coverage", "segment_part", "guidance_options", "load_edit_guidance",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# ---------------------------------------------------------------------- inputs
def _check_model(model: str, tiny: str | None, key: str) -> None:
    """A local folder must exist (unless `tiny` will write it); a hub id must be cached when offline;
    a `random:` source needs its architecture configs."""
    if is_random(model):
        try:
            arch_folder(model)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{key}: {err}") from None
        return
    path = Path(os.path.expanduser(str(model)))
    if path.exists():
        if path.is_dir() and not (path / "model_index.json").is_file() and key == "guidance.model":
            raise FileNotFoundError(f"{key}: {path} has no model_index.json (not a diffusers pipeline folder)")
        return
    if tiny is not None:
        return
    if not _HUB_ID.match(str(model)) or str(model).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{key}: model path {model!r} does not exist")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        from huggingface_hub import try_to_load_from_cache

        probe = "model_index.json" if key == "guidance.model" else "config.json"
        if not isinstance(try_to_load_from_cache(str(model), probe), str):
            raise FileNotFoundError(f"{key}: {model!r} is not a local folder and is not in the Hugging Face "
                                    "cache (HF_HUB_OFFLINE is set)")


def check_inputs(cfg: EditConfig) -> None:
    """Every file the config names exists (FileNotFoundError naming the key) — before any loading."""
    files = {"scene": cfg.scene, "cameras.path": cfg.cameras.path, "segment.mask_file": cfg.segment.mask_file,
             "segment.labelled_ply": cfg.segment.labelled_ply}
    for key, value in files.items():
        if value is not None and not Path(value).exists():
            raise FileNotFoundError(f"{key}: {value} does not exist")
    _check_model(cfg.guidance.model, cfg.guidance.tiny, "guidance.model")
    if cfg.report.clip_model is not None:
        _check_model(cfg.report.clip_model, None, "report.clip_model")
    if cfg.segment.source == "galp" and cfg.segment.mask_source == "files":
        folder = cfg.segment.mask_options.get("path")
        if folder is None or not Path(folder).is_dir():
            raise FileNotFoundError(f"segment.mask_options.path: mask folder {folder!r} does not exist")


def load_scene(path: str | os.PathLike, device: torch.device) -> GaussianScene:
    scene = GaussianScene.load(path)
    if len(scene) == 0:
        raise ValueError(f"scene {path} has no Gaussians")
    return scene.to(device)


PART_RING_RATIO = 10.0  # cameras.center "auto": a ring around the part when the scene is this much larger


def resolve_ring(cfg, scene: GaussianScene, mask: Tensor | None = None):
    """`cfg` (a CameraConfig) with `center`, `radius` and `up` made concrete for this scene and part
    mask [N] bool (None: not known yet, the scene stands for the part). Recorded as resolved in the
    run's config, so the run can be repeated exactly."""
    part = scene.subset(mask.cpu()) if mask is not None and bool(mask.any()) else scene
    center = cfg.center
    if center in (None, "auto"):
        center = "part" if scene_radius(scene) > PART_RING_RATIO * scene_radius(part) else "scene"
    if isinstance(center, str):
        target = part if center == "part" else scene
        point, size = target.center(0.01).double().cpu(), scene_radius(target)
    else:
        point = torch.tensor([float(v) for v in center], dtype=torch.float64)
        size = scene_radius(scene)
    up = cfg.up if not isinstance(cfg.up, str) else estimate_up(scene, load_cameras(cfg.path) if cfg.path else None)
    return replace(cfg, center=point.tolist(), radius=cfg.radius or cfg.radius_factor * size,
                   up=[float(v) for v in up])


def estimate_up(scene: GaussianScene, cameras: Cameras | None = None) -> list[float]:
    """World up: the mean of the cameras' up directions (OpenCV -y), else the scene's axis of least
    spread (a ground), signed towards the longer tail of the points along it (things rise from it)."""
    if cameras is not None:
        up = -cameras.camtoworlds()[:, :3, 1].double().mean(0)
        return (up / up.norm().clamp_min(1e-12)).tolist()
    pts = scene.means.detach().double().cpu()
    lo, hi = scene.bbox(0.01)
    pts = pts[((pts >= lo.double().cpu()) & (pts <= hi.double().cpu())).all(1)]
    d = pts - pts.mean(0)
    axis = torch.linalg.eigh(d.T @ d).eigenvectors[:, 0]  # smallest eigenvalue first
    skew = float(((d @ axis) ** 3).mean())
    return (axis if skew >= 0 else -axis).tolist()


def make_cameras(cfg, scene: GaussianScene) -> Cameras:
    """The camera file (rescaled to width x height) or an orbit ring of n_azimuths x n_elevations views.

    `cfg`: a CameraConfig; one not yet resolved (`resolve_ring`) is resolved for the whole scene."""
    if isinstance(cfg.center, str) or cfg.center is None or cfg.radius is None or isinstance(cfg.up, str):
        cfg = resolve_ring(cfg, scene)
    if cfg.path is not None:
        cams = load_cameras(cfg.path)
        if cfg.width is not None and cfg.height is not None and (cams.width, cams.height) != (cfg.width, cfg.height):
            cams = cams.scaled(width=cfg.width, height=cfg.height)
        return cams
    center, radius = torch.tensor(cfg.center, dtype=torch.float64), cfg.radius
    lo, hi = cfg.elevation_range
    elevations = np.linspace(lo, hi, cfg.n_elevations) if cfg.n_elevations > 1 else [0.5 * (lo + hi)]
    rings = [orbit_path(center, radius, cfg.n_azimuths, elevation_deg=float(e), fov_deg=cfg.fov_deg,
                        width=cfg.width or 512, height=cfg.height or 512, up=cfg.up) for e in elevations]
    return Cameras.cat(rings)


def scene_radius(scene: GaussianScene) -> float:
    """Half the diagonal of the bounding box (1% outliers ignored)."""
    lo, hi = scene.bbox(0.01)
    return max(float((hi - lo).norm()) / 2.0, 1e-6)


def camera_angles(cameras: Cameras, center: Tensor, up, front_deg: float = 0.0) -> tuple[Tensor, Tensor]:
    """([C] azimuth, [C] elevation) in degrees of the camera centres around `center`, in the ring's
    convention (azimuth 0 = orbit_path's start direction), azimuth shifted so `front_deg` is 0."""
    from gendistill.core.cameras import ring_basis

    u, a, b = ring_basis(torch.as_tensor(up, dtype=torch.float64))
    d = cameras.centers().double().cpu() - center.double().cpu()
    d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    elevation = torch.rad2deg(torch.asin((d @ u).clamp(-1, 1)))
    azimuth = torch.rad2deg(torch.atan2(d @ b, d @ a)) - front_deg
    return (azimuth + 180.0) % 360.0 - 180.0, elevation


def visible_gaussians(means: Tensor, cameras: Cameras, near: float = 0.01) -> Tensor:
    """[C, N] bool: the Gaussian's centre is in front of the camera and inside its image."""
    cams = cameras.to(means.device, means.dtype)
    uv, z = cams.project(means)
    return (z > near) & (uv[..., 0] >= 0) & (uv[..., 0] < cams.width) & (uv[..., 1] >= 0) & (uv[..., 1] < cams.height)


@torch.no_grad()
def part_coverage(scene: GaussianScene, mask: Tensor, cameras: Cameras, *, size: int = 64, backend: str = "auto",
                  chunk: int = 8) -> Tensor:
    """[C] pixels of each view, rendered at `size` on its longer side, that the part dominates (over
    half of the pixel's colour), occlusion by the rest of the scene included."""
    from gendistill.core.render import rasterize

    small = cameras.scaled(size / max(cameras.width, cameras.height)).to(scene.device, scene.means.dtype)
    args = dict(scene.render_args(), colors=mask.to(scene.means)[:, None], sh_degree=None)
    counts = []
    for i in range(0, len(small), chunk):
        c = small[i:i + chunk]
        img, _, _ = rasterize(**args, viewmats=c.viewmats, Ks=c.Ks, width=c.width, height=c.height, backend=backend)
        counts.append((img[..., 0] > 0.5).sum((1, 2)).cpu())
    return torch.cat(counts)


# ---------------------------------------------------------------------- segmentation
def segment_part(scene: GaussianScene, cfg: EditConfig, cameras: Cameras, work_dir: str | os.PathLike | None = None,
                 progress: bool = True) -> Tensor:
    """The part's 3D mask [N] bool from `cfg.segment` (see `SegmentConfig`); ValueError if it is empty.

    With source "galp" and a "files" or "attention" mask source, `gendistill segment` runs into
    `work_dir` (labelled.ply, masks3d/ of every part, overlays, contact sheet) when it is given.
    """
    seg, part = cfg.segment, cfg.part
    source = seg.source
    if source == "auto":
        if seg.mask_file is not None:
            source = "mask_file"
        elif seg.labelled_ply is not None or scene.label_sh is not None:
            source = "labels"
        elif seg.part_attr in scene.extras:
            source = "property"
        else:
            source = "galp"
    if source == "mask_file":
        mask = _mask_from_file(seg.mask_file, part, len(scene))
    elif source == "labels":
        mask = _mask_from_labels(scene, seg, part)
    elif source == "property":
        mask = _mask_from_property(scene, seg.part_attr, part)
    else:
        mask = _mask_from_galp(scene, cfg, cameras, work_dir, progress)
    mask = mask.to(scene.device, torch.bool)
    if not bool(mask.any()):
        raise ValueError(f"part {part!r} matches no Gaussian (segment source {source!r})")
    return mask


def _mask_from_file(path, part: str, n: int) -> Tensor:
    path = Path(path)
    if path.is_dir():
        path = path / "masks3d" / f"{part}.npy" if (path / "masks3d").is_dir() else path / f"{part}.npy"
    if not path.is_file():
        raise FileNotFoundError(f"segment.mask_file: no mask {path} for part {part!r}")
    arr = np.load(path)
    if arr.shape != (n,):
        raise ValueError(f"segment.mask_file: {path} has shape {arr.shape}, the scene has {n} Gaussians")
    return torch.from_numpy(arr.astype(bool) if arr.dtype != bool else arr)


def _mask_from_labels(scene: GaussianScene, seg, part: str) -> Tensor:
    from gendistill.splat_edit.galp import masks_from_scene

    labelled = scene if seg.labelled_ply is None else GaussianScene.load_ply(seg.labelled_ply)
    if len(labelled) != len(scene):
        raise ValueError(f"segment.labelled_ply has {len(labelled)} Gaussians, the scene {len(scene)}; "
                         "it must be indexed like the scene")
    return masks_from_scene(labelled, [part], threshold=seg.threshold)[part].cpu()


def _mask_from_property(scene: GaussianScene, attr: str, part: str) -> Tensor:
    from gendistill.splat_edit.part_masks import scene_part_ids

    ids, names = scene_part_ids(scene, attr)
    if part not in names:
        raise ValueError(f"part {part!r} matches no Gaussian: the scene's {attr!r} names are {names}")
    return (ids == names.index(part)).cpu()


def _mask_from_galp(scene: GaussianScene, cfg: EditConfig, cameras: Cameras, work_dir, progress: bool) -> Tensor:
    from gendistill.splat_edit.galp import train_label_field
    from gendistill.splat_edit.part_masks import get_part_masks

    seg, part = cfg.segment, cfg.part
    parts = list(seg.parts or [part])
    if part not in parts:
        parts.append(part)
    galp = replace(seg.galp, threshold=seg.threshold)
    options = dict(seg.mask_options)
    if work_dir is not None and seg.mask_source in ("files", "attention"):
        from gendistill.splat_edit.segment import segment

        if seg.mask_source == "files":
            kw = {"masks_dir": options.pop("path")}
        else:
            kw = {"attention_model": options.pop("pipeline"), "prompt": options.pop("prompt", cfg.prompt)}
            kw.update({k: options.pop(k) for k in ("views", "size", "temperatures") if k in options})
            kw["attention_options"], options = options, {}  # capture, refine, resolution, ...: checked there
        if options:
            raise ValueError(f"segment.mask_options: unknown option(s) {sorted(options)} for mask source "
                             f"{seg.mask_source!r}")
        result = segment(cfg.scene, parts, work_dir, config=galp, device=str(scene.device), progress=progress, **kw)
        return torch.from_numpy(np.load(result["masks3d"][part]))
    if seg.mask_source in ("attention", "callable", "clipseg", "sam"):  # the edit's ring, unless given
        options.setdefault("cameras", cameras)
    masks = get_part_masks(seg.mask_source, scene, parts, **options)
    field = train_label_field(scene, masks.cameras.to(scene.device), masks.masks.to(scene.device), masks.parts, galp,
                              progress=progress)
    return field.masks_3d()[field.parts.index(part)].cpu()


# ---------------------------------------------------------------------- guidance
def guidance_options(cfg: GuidanceConfig) -> dict:
    """The `load_guidance` arguments of a GuidanceConfig, other than the model and where it loads."""
    options = dict(cfg.options)
    if cfg.resolution is not None:
        options["resolution"] = tuple(cfg.resolution)
    return dict(kind=cfg.kind, guidance_scale=cfg.guidance_scale, weighting=cfg.weighting, t_range=tuple(cfg.t_range),
                cfg=cfg.cfg, view_dependent=cfg.view_dependent, reduction=cfg.reduction, **options)


def load_edit_guidance(cfg: GuidanceConfig, device: torch.device):
    """`load_guidance` from the config (writing the tiny pipeline first when asked)."""
    from gendistill.core.guidance import load_guidance

    if cfg.tiny is not None and not Path(cfg.model).exists():
        from gendistill.testing.diffusion import write_tiny_pipeline

        write_tiny_pipeline(cfg.tiny, cfg.model)
    return load_guidance(cfg.model, dtype=cfg.dtype, device=None if cfg.cpu_offload else device,
                         cpu_offload=cfg.cpu_offload, pipeline_kwargs=dict(cfg.pipeline_kwargs),
                         **guidance_options(cfg))
