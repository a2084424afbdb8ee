"""Settings of `gendistill edit` (RoMaP part editing): nested dataclasses loaded with `load_config`.

    cfg = load_edit_config("configs/splat_edit/tiny_cpu.yaml", ["scene=assets/scenes/snowman.ply", "part=hat",
                           "edit_prompt=a snowman with a gold hat", "out=outputs/edit"])

Groups: `cameras` (a camera file or a generated orbit ring), `segment` (where the part's 3D mask
comes from), `guidance` (the diffusion model), `anchors` (SLaMP 2D targets), `optim` (RoMaP's
per-parameter learning rates), `densify` (gsplat DefaultStrategy settings, applied inside the
part only), `report` (outputs and metrics). Defaults are RoMaP's where the paper or its released
code gives a value, ours otherwise (marked "ours").
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from gendistill.config import load_config
from gendistill.splat_edit.galp import GALPConfig
from gendistill.splat_edit.slamp import SLaMPConfig

__all__ = [
    "CameraConfig", "SegmentConfig", "GuidanceConfig", "AnchorConfig", "LearningRates", "DensifyConfig",
    "ReportConfig", "EditConfig", "load_edit_config",
]


@dataclass
class CameraConfig:
    """Views for score distillation, anchors and the report.

    path: transforms.json / COLMAP model / .npz (`load_cameras`); None generates an orbit ring.
    width, height: render size (a camera file is rescaled to it; None keeps the file's size).
    Ring: n_azimuths x n_elevations cameras (elevations evenly spaced over elevation_range, degrees),
    at `radius` around `center`, horizontal field of view fov_deg, world `up`.
    center: "scene" (the scene's bounding-box centre, 1% outliers ignored), "part" (the part's), [x, y,
    z], or "auto" (default): "part" when the scene is over 10 times the part's size (an
    unbounded capture around a small object), else "scene".
    radius: None: radius_factor x the bounding-sphere radius of what the ring is centred on.
    up: [x, y, z] or "auto": the loaded cameras' mean up (cameras.path), else the scene's axis of least
    spread, pointing to the side its points trail off to (a ground with things on it).
    front_azimuth_deg: azimuth (ring convention) of the object's front, for view-dependent prompts.
    """

    path: Optional[str] = None
    width: Optional[int] = 512
    height: Optional[int] = 512
    n_azimuths: int = 24
    n_elevations: int = 3
    elevation_range: list[float] = field(default_factory=lambda: [0.0, 30.0])
    radius: Optional[float] = None
    radius_factor: float = 2.6
    center: Any = "auto"  # "auto" | "scene" | "part" | [x, y, z]
    fov_deg: float = 45.0
    up: Any = field(default_factory=lambda: [0.0, 0.0, 1.0])  # [x, y, z] | "auto"
    front_azimuth_deg: float = 0.0


@dataclass
class SegmentConfig:
    """Where the part's 3D mask comes from.

    source: "auto" (mask_file if set, else a label field in labelled_ply or the scene, else the
    scene's `part_attr` property, else "galp"), "mask_file" (a [N] bool .npy as `gendistill segment`
    writes to masks3d/<part>.npy, or a folder holding masks3d/), "labels" (a 3D-GALP labelled PLY
    indexed like the scene), "property" (an integer per-Gaussian property named by part_attr, its
    names in the `<part_attr>_names` PLY comment, like the demo scene), "galp" (train 3D-GALP here
    from the 2D masks of `mask_source`).
    threshold: which Gaussians are the part (edited, and prior-removed): those whose view-averaged
    3D-GALP label colour is within `threshold` of the part's code, as summed |difference| over RGB.
    0.3 (default, ours): only confidently labelled Gaussians change, so a boundary Gaussian of a
    neighbouring part with a half-way label keeps its bytes. RoMaP's thresholds (configs/FIDELITY.md):
    1.0 (`seg_3d_threshold`, romap_sd3.yaml and `gendistill segment`) on the label seen from view 0
    picks the Gaussians whose prior is removed; 0.3 on the raw SH DC coefficient (not the colour)
    gates densification gradients every step (not reproduced: our part set is fixed per run); its 2D
    masks take pixels whose mean |difference| per channel is below 0.34.
    parts: all parts for "galp" (default: just the edited one); mask_source / mask_options: a
    `MASK_SOURCES` entry ("files", "attention", "callable", "clipseg", "sam") and its options (e.g.
    {path: masks_dir} for "files"; {cameras: cams.json, model: clipseg_dir} for "clipseg";
    {cameras: cams.json, model: sam_dir, selection: masks3d/nose.npy} for "sam"); galp: the 3D-GALP
    settings (`GALPConfig`, e.g. segment.galp.steps=300; its threshold is `threshold` above).
    """

    source: str = "auto"
    mask_file: Optional[str] = None
    labelled_ply: Optional[str] = None
    part_attr: str = "part"
    threshold: float = 0.3
    parts: Optional[list[str]] = None
    mask_source: str = "files"
    mask_options: dict[str, Any] = field(default_factory=dict)
    galp: GALPConfig = field(default_factory=GALPConfig)


@dataclass
class GuidanceConfig:
    """The diffusion model used for SDS and SLaMP (`load_guidance` arguments).

    model: hub id or local folder. tiny: "sd", "sd3" or "ip2p" writes the tiny test pipeline of
    that kind to `model` (a folder) when it is missing, then loads it with from_pretrained as a
    real model (tests and quick CPU trials only).
    t_range: (lo, hi) fractions of the training noise schedule, ascending in noise for every kind
    (see `gendistill.core.guidance.schedule`). model may also be `random:<hub id>` (full size,
    random weights: `gendistill.core.architectures`).
    kind: "auto", "sds", "rfds" or "ip2p". reduction: how the masked SDS loss is reduced
    (`gendistill.core.guidance.REDUCTIONS`): "masked_mean" is RoMaP's (the mean over the masked latent
    elements, hard mask); "mean" (ours) divides the summed loss by every latent element, so the SDS
    gradient per pixel does not grow as the part shrinks; "sum" is threestudio's.
    options: other `load_guidance` options (grad_clip, t_anneal, image_guidance_scale, ...).
    pipeline_kwargs: `from_pretrained` arguments (e.g. {text_encoder_3: null, tokenizer_3: null}).
    """

    model: str = MISSING
    tiny: Optional[str] = None
    kind: str = "auto"
    guidance_scale: float = 100.0
    weighting: str = "sds"
    t_range: list[float] = field(default_factory=lambda: [0.02, 0.98])
    cfg: str = "standard"
    dtype: Optional[str] = None
    cpu_offload: Optional[str] = None
    resolution: Optional[list[int]] = None
    negative_prompt: str = ""
    view_dependent: bool = True
    reduction: str = "mean"
    options: dict[str, Any] = field(default_factory=dict)
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class AnchorConfig:
    """The anchor views and their 2D edits (targets of the L1 anchor loss).

    views: camera indices; None picks `count` views where the part covers most pixels (at least
    min_separation_deg apart). method: "auto" (SLaMP for sds / rfds guidance, the InstructPix2Pix
    pipeline for ip2p), "slamp", "ip2p" or "none" (no anchor loss). mask_dilation: pixels added
    around the part's 2D mask before editing. slamp: the SLaMP settings
    (`SLaMPConfig`; an empty source_prompt takes the edit's `prompt`). ip2p_steps /
    ip2p_guidance_scale / ip2p_image_guidance_scale: the pipeline call for method "ip2p".
    remove_background: drop part Gaussians whose anchor target pixel is background (RoMaP);
    background_tolerance: max |target - background| per channel that counts as background.
    """

    views: Optional[list[int]] = None
    count: int = 1
    min_separation_deg: float = 60.0
    method: str = "auto"
    mask_dilation: int = 0
    slamp: SLaMPConfig = field(default_factory=SLaMPConfig)
    ip2p_steps: int = 20
    ip2p_guidance_scale: float = 7.5
    ip2p_image_guidance_scale: float = 1.5
    remove_background: bool = True
    background_tolerance: float = 0.02


@dataclass
class LearningRates:
    """Adam learning rates per parameter (RoMaP); positions stay frozen unless lr_means > 0."""

    lr_color: float = 0.0125
    sh_rest_factor: float = 1.0 / 20.0
    lr_opacity: float = 0.01
    lr_scale: float = 0.005
    lr_rotation: float = 0.001
    lr_means: float = 0.0


@dataclass
class DensifyConfig:
    """gsplat DefaultStrategy inside the part: RoMaP densifies every 50 steps from 200 to 900 with
    INRIA's densify_and_prune(max_grad=0.0005, min_opacity=0.005); scene_scale is the scene's
    bounding-sphere radius."""

    enabled: bool = True
    start: int = 200
    stop: int = 900
    every: int = 50
    grow_grad2d: float = 0.0005
    prune_opa: float = 0.005
    grow_scale3d: float = 0.01
    prune_scale3d: float = 0.1


@dataclass
class ReportConfig:
    """Outputs: before/after grid views, side-by-side turntable, CLIP metrics (when clip_model is set)."""

    grid_views: int = 4
    turntable_frames: int = 48
    fps: float = 12.0
    elevation_deg: Optional[float] = None
    clip_model: Optional[str] = None
    outside_threshold: float = 0.02


@dataclass
class LiveViewConfig:
    """The live view of a running edit (`gendistill.viewer.live`): with `port` set, a local page
    (viser) shows the part's current Gaussians, the loss curves and the latest SDS view, updated
    every `every` steps. host: the address served on (0.0.0.0: other machines too)."""

    port: Optional[int] = None
    host: str = "127.0.0.1"
    every: int = 10


@dataclass
class EditConfig:
    """`gendistill edit`: scene, part, prompts and run folder are required (usually on the command line).

    prompt: describes the input ("a snowman with a hat"): SLaMP's inversion prompt and the CLIP
    direction's source. edit_prompt: the edit ("a snowman with a gold hat").
    steps: optimisation steps; batch_size: random ring views per step (SDS);
    lambda_sds / lambda_anchor: weights of the masked SDS and the masked L1 anchor loss.
    sds_prompt: the SDS prompt: "prompt+edit_prompt" (RoMaP: `prompt + " " + edit_prompt`, so write
    edit_prompt as the change, "with a gold hat") or "edit_prompt" (edit_prompt alone, a full sentence).
    prior_removal: reset the part's colour before editing (RoMaP's Gaussian prior removal): "dc" zeroes
    the SH DC term only (RoMaP: neutral grey, view-dependent terms kept), "all" every SH coefficient,
    "none" keeps the colours (true / false read as "dc" / "none").
    background: RGB behind the Gaussians. mask_dilation: pixels added to the SDS mask.
    device: "cpu" / "cuda" (None: cuda when available). backend: render backend.
    profile: synchronise and time each stage of a step (summary.json "timings").
    max_nonfinite_steps: a step whose loss or gradients hold NaN/inf is skipped (counted in summary.json
    "steps_skipped_nonfinite"); this many in a row stop the edit with an error.
    export: scene formats of the result: `edited.ply` always, and `edited.spz`, `edited.splat`,
    `edited.compressed.ply` beside it for "spz", "splat", "compressed-ply".
    viewer: the live view in a browser (`viewer.port=8080`; see `LiveViewConfig`).
    """

    scene: str = MISSING
    part: str = MISSING
    edit_prompt: str = MISSING
    out: str = MISSING
    prompt: str = ""
    steps: int = 1000
    batch_size: int = 1
    lambda_sds: float = 1.0
    lambda_anchor: float = 10.0
    sds_prompt: str = "edit_prompt"
    prior_removal: str = "dc"
    background: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    mask_dilation: int = 1
    seed: int = 0
    device: Optional[str] = None
    backend: str = "auto"
    profile: bool = False
    log_every: int = 10
    max_nonfinite_steps: int = 10
    export: list[str] = field(default_factory=lambda: ["ply"])
    cameras: CameraConfig = field(default_factory=CameraConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    optim: LearningRates = field(default_factory=LearningRates)
    densify: DensifyConfig = field(default_factory=DensifyConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    viewer: LiveViewConfig = field(default_factory=LiveViewConfig)

    def __post_init__(self):  # YAML's true / false in a str field arrive as "True" / "False"
        self.prior_removal = {"True": "dc", "False": "none"}.get(str(self.prior_removal), self.prior_removal)


def load_edit_config(path: str | os.PathLike | None = None, overrides=()) -> EditConfig:
    """`load_config(EditConfig, path, overrides)` plus value checks that need no files."""
    cfg = load_config(EditConfig, path, overrides)
    check_values(cfg)
    return cfg


def _is_device(name: str) -> bool:
    import torch

    try:
        torch.device(name)
        return True
    except RuntimeError:
        return False


def check_values(cfg: EditConfig) -> None:
    """ValueError naming the key for a value out of range (before anything is loaded)."""
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ValueError(f"config {key}: {msg}")

    need(cfg.steps >= 0, "steps", f"must be >= 0, got {cfg.steps}")
    need(cfg.max_nonfinite_steps >= 1, "max_nonfinite_steps", f"must be >= 1, got {cfg.max_nonfinite_steps}")
    need(cfg.batch_size >= 1, "batch_size", f"must be >= 1, got {cfg.batch_size}")
    need(cfg.lambda_sds >= 0 and cfg.lambda_anchor >= 0, "lambda_sds/lambda_anchor", "must be >= 0")
    need(len(cfg.background) == 3, "background", f"must be [r, g, b], got {cfg.background}")
    need(bool(str(cfg.part).strip()), "part", "is empty")
    need(bool(str(cfg.edit_prompt).strip()), "edit_prompt", "is empty")
    c = cfg.cameras
    need(c.n_azimuths >= 1 and c.n_elevations >= 1, "cameras.n_azimuths/n_elevations", "must be >= 1")
    need(len(c.elevation_range) == 2 and all(-90 < e < 90 for e in c.elevation_range),
         "cameras.elevation_range", f"must be [lo, hi] inside (-90, 90), got {c.elevation_range}")
    need(0 < c.fov_deg < 180, "cameras.fov_deg", f"must be in (0, 180), got {c.fov_deg}")
    def vector_or(value, words) -> bool:
        if isinstance(value, str):
            return value in words
        try:
            return len(value) == 3 and all(math.isfinite(float(v)) for v in value)
        except (TypeError, ValueError):
            return False

    need(vector_or(c.up, ("auto",)), "cameras.up", f"must be [x, y, z] or 'auto', got {c.up}")
    need(c.center is None or vector_or(c.center, ("auto", "scene", "part")), "cameras.center",
         f"must be 'auto', 'scene', 'part' or [x, y, z], got {c.center}")
    need(c.radius is None or c.radius > 0, "cameras.radius", f"must be positive, got {c.radius}")
    for key in ("width", "height"):
        v = getattr(c, key)
        need(v is None or v > 0, f"cameras.{key}", f"must be positive, got {v}")
    sources = ("auto", "mask_file", "labels", "property", "galp")
    need(cfg.segment.source in sources, "segment.source", f"must be one of {sources}, got {cfg.segment.source!r}")
    need(cfg.device is None or _is_device(cfg.device), "device",
         f"must be cpu, cuda, cuda:N or null (cuda when available), got {cfg.device!r}")
    from gendistill.core.formats import SCENE_FORMATS

    writable = [name for name, f in SCENE_FORMATS.items() if f.write]
    bad = [fmt for fmt in cfg.export if fmt not in writable]
    need(not bad, "export", f"{bad} cannot be written; scene formats: {', '.join(writable)}")
    need(cfg.prior_removal in ("dc", "all", "none"), "prior_removal",
         f"must be 'dc', 'all' or 'none', got {cfg.prior_removal!r}")
    need(cfg.sds_prompt in ("prompt+edit_prompt", "edit_prompt"), "sds_prompt",
         f"must be 'prompt+edit_prompt' or 'edit_prompt', got {cfg.sds_prompt!r}")
    from gendistill.core.guidance import REDUCTIONS

    need(cfg.guidance.reduction in REDUCTIONS, "guidance.reduction",
         f"must be one of {REDUCTIONS}, got {cfg.guidance.reduction!r}")
    need(cfg.guidance.tiny in (None, "sd", "sd3", "ip2p"), "guidance.tiny",
         f"must be null, 'sd', 'sd3' or 'ip2p', got {cfg.guidance.tiny!r}")
    methods = ("auto", "slamp", "ip2p", "none")
    need(cfg.anchors.method in methods, "anchors.method", f"must be one of {methods}, got {cfg.anchors.method!r}")
    need(cfg.anchors.count >= 0, "anchors.count", f"must be >= 0, got {cfg.anchors.count}")
    need(cfg.report.grid_views >= 1 and cfg.report.turntable_frames >= 1, "report.grid_views/turntable_frames",
         "must be >= 1")
    need(cfg.viewer.port is None or 0 < cfg.viewer.port < 65536, "viewer.port",
         f"must be a port number (1-65535) or null, got {cfg.viewer.port}")
    need(cfg.viewer.every >= 1, "viewer.every", f"must be >= 1, got {cfg.viewer.every}")
    from gendistill.core.guidance import GUIDANCE
    from gendistill.core.guidance.load import guidance_options
    from gendistill.registry import load_plugins

    load_plugins()
    kinds = ("auto", *sorted(GUIDANCE))
    need(cfg.guidance.kind in kinds, "guidance.kind", f"must be one of {kinds}, got {cfg.guidance.kind!r}")
    known = guidance_options(cfg.guidance.kind) - {"resolution", "view_dependent", "reduction"}  # own keys here
    unknown = sorted(set(cfg.guidance.options) - known)
    need(not unknown, "guidance.options", f"unknown option(s) {', '.join(unknown)} for kind "
                                          f"{cfg.guidance.kind!r}; known: {', '.join(sorted(known))}")
    need(cfg.segment.galp.threshold in (GALPConfig.threshold, cfg.segment.threshold), "segment.galp.threshold",
         "set segment.threshold instead (the editor's part threshold)")
