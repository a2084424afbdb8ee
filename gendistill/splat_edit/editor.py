"""RoMaP part editing of a Gaussian-splat scene (`gendistill edit`), one small function per stage.

    result = run_edit(load_edit_config("configs/splat_edit/tiny_cpu.yaml", ["scene=...", "part=hat", ...]))

1. inputs (`gendistill.splat_edit.edit_inputs`): the scene, the cameras (a camera file or an orbit
   ring), clear errors before any long work (missing files, unknown part, nothing in view, model
   folder missing); `prepare_edit` runs them all.
2. `segment_part`: the part's 3D mask [N] bool (mask file, 3D-GALP label field, integer `part`
   property, or 3D-GALP trained here from 2D masks); written to masks3d/<part>.npy.
3. `remove_prior`: the part's SH DC term (or every SH coefficient) set to zero: neutral grey (RoMaP's
   Gaussian prior removal).
4. anchors: the part rendered in one or more views and edited in 2D (`slamp_edit`, or the
   InstructPix2Pix pipeline for ip2p guidance); part Gaussians whose target pixel is background go.
5. `PartEditor`: N steps of L = lambda_sds * masked SDS (random ring views) + lambda_anchor * masked
   L1 (anchor renders vs targets). Only the part's Gaussians are parameters (rendered with the
   frozen rest by `gendistill.core.render.render_part`), so every other Gaussian keeps its exact bytes; gsplat's DefaultStrategy
   densifies and prunes them; RoMaP's per-parameter learning rates.
6. outputs (`gendistill.splat_edit.report`): edited.ply, masks, targets, grid, turntable, loss
   curve, summary.json, report.html. SIGINT / SIGTERM stop after the current step and still write
   a complete result; edited.ply is written atomically.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gendistill.core.cameras import Cameras
from gendistill.core.formats import SCENE_FORMATS, write_scene
from gendistill.core.render import RestCache, render_part
from gendistill.core.runtime import adam, resolve_device
from gendistill.core.scene import GaussianScene
from gendistill.splat_edit.edit_config import EditConfig
from gendistill.splat_edit.edit_inputs import (
    camera_angles,
    check_inputs,
    load_edit_guidance,
    load_scene,
    make_cameras,
    part_coverage,
    resolve_ring,
    scene_radius,
    segment_part,
    visible_gaussians,
)

__all__ = [
    "run_edit", "prepare_edit", "remove_prior", "sds_prompt", "activated", "dilate", "pick_anchor_views", "make_anchor_targets",
    "background_gaussians", "anchor_stage", "PartEditor", "Anchors", "StopRequest", "EditResult",
    # re-exported from edit_inputs
    "check_inputs", "make_cameras", "camera_angles", "visible_gaussians", "segment_part", "load_edit_guidance",
]


# ---------------------------------------------------------------------- prior removal, rendering
def activated(means, quats, log_scales, opacity_logits, sh) -> dict[str, Tensor]:
    """The tensors `render_part` takes: scales exp(log_scales), opacities sigmoid(logits)."""
    return {"means": means, "quats": quats, "scales": log_scales.exp(), "opacities": torch.sigmoid(opacity_logits),
            "sh": sh}


def remove_prior(sh: Tensor, mask: Tensor, terms: str = "dc") -> Tensor:
    """A copy of sh [N, K, 3] with the masked Gaussians' SH DC term ("dc", RoMaP: base colour neutral
    grey 0.5, view-dependent terms kept) or every coefficient ("all": grey from every side) zero."""
    if terms not in ("dc", "all"):
        raise ValueError(f"terms must be 'dc' or 'all', got {terms!r}")
    out = sh.clone()
    if terms == "dc":
        out[mask, :1] = 0.0
    else:
        out[mask] = 0.0
    return out


def _sh(params: dict[str, Tensor]) -> Tensor:
    """[P, K, 3] SH of the part's parameters: "sh0" [P, 1, 3] and, above degree 0, "shN" [P, K-1, 3]."""
    return params["sh0"] if "shN" not in params else torch.cat([params["sh0"], params["shN"]], 1)


def sds_prompt(cfg: EditConfig) -> str:
    """The SDS prompt: RoMaP's `prompt + " " + edit_prompt`, or edit_prompt alone (`cfg.sds_prompt`)."""
    if cfg.sds_prompt == "prompt+edit_prompt" and cfg.prompt:
        return f"{cfg.prompt} {cfg.edit_prompt}"
    return cfg.edit_prompt


def dilate(mask: Tensor, pixels: int) -> Tensor:
    """Binary dilation of [C, H, W] masks by a (2p+1)^2 square."""
    if pixels <= 0:
        return mask
    return F.max_pool2d(mask[:, None].float(), 2 * pixels + 1, stride=1, padding=pixels)[:, 0]


# ---------------------------------------------------------------------- anchors
def pick_anchor_views(coverage: Tensor, azimuths: Tensor, count: int, min_separation_deg: float = 60.0) -> list[int]:
    """Greedy: views by decreasing part coverage [C] (pixels), each at least min_separation_deg in
    azimuth from those taken (relaxed when too few); views that do not see the part are skipped."""
    order = torch.argsort(coverage, descending=True, stable=True).tolist()
    order = [i for i in order if coverage[i] > 0]
    taken: list[int] = []
    for sep in (min_separation_deg, 0.0):
        for i in order:
            if len(taken) >= count:
                return taken
            d = [abs((float(azimuths[i]) - float(azimuths[j]) + 180) % 360 - 180) for j in taken]
            if i not in taken and all(x >= sep for x in d):
                taken.append(i)
    return taken


def make_anchor_targets(guidance, images: Tensor, masks: Tensor, cfg: EditConfig, method: str, *,
                        azimuth=None, elevation=None, cond_images: Tensor | None = None) -> Tensor:
    """2D edits of anchor renders: images [A,3,H,W], masks [A,1,H,W] -> targets [A,3,H,W] in [0, 1].

    "slamp": `slamp_edit` with the edit prompt (inversion prompt = cfg.prompt); "ip2p": the
    InstructPix2Pix pipeline on `cond_images` (the original views), composited into the render
    outside the mask.
    """
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
    size = images.shape[-2:]
    if method == "slamp":
        from gendistill.splat_edit.slamp import slamp_edit

        slamp_cfg = replace(cfg.anchors.slamp, source_prompt=cfg.anchors.slamp.source_prompt or cfg.prompt)
        out = slamp_edit(guidance, images, masks, cfg.edit_prompt, cfg.guidance.negative_prompt, slamp_cfg,
                         azimuth=azimuth, elevation=elevation, generator=gen)
        edited = out.images
    else:
        pipe = guidance.pipe
        src = cond_images if cond_images is not None else images
        src = guidance.check_images(src)
        edited = pipe(prompt=[cfg.edit_prompt] * len(src), image=src, num_inference_steps=cfg.anchors.ip2p_steps,
                      guidance_scale=cfg.anchors.ip2p_guidance_scale,
                      image_guidance_scale=cfg.anchors.ip2p_image_guidance_scale, generator=gen, output_type="pt").images
    edited = edited.float().to(images.device)
    if tuple(edited.shape[-2:]) != tuple(size):
        edited = F.interpolate(edited, size=size, mode="bilinear", align_corners=False)
    return (edited * masks + images * (1 - masks)).clamp(0, 1) if method != "slamp" else edited.clamp(0, 1)


def background_gaussians(means: Tensor, cameras: Cameras, masks: Tensor, targets: Tensor, background: Tensor,
                         tolerance: float) -> Tensor:
    """[P] bool: part Gaussians whose centre lands, in some anchor view, on a masked pixel whose target
    is background (every channel within `tolerance`). masks [A,H,W] bool, targets [A,3,H,W]."""
    cams = cameras.to(means.device, means.dtype)
    uv, z = cams.project(means)
    px = uv.floor().long()
    inside = (z > 0.01) & (px[..., 0] >= 0) & (px[..., 0] < cams.width) & (px[..., 1] >= 0) & (px[..., 1] < cams.height)
    is_bg = masks & ((targets - background.to(targets).view(1, 3, 1, 1)).abs().amax(dim=1) <= tolerance)
    out = torch.zeros(len(means), dtype=torch.bool, device=means.device)
    for a in range(len(cams)):
        ok = inside[a]
        hit = torch.zeros_like(ok)
        hit[ok] = is_bg[a, px[a, ok, 1], px[a, ok, 0]].to(means.device)
        out |= hit
    return out


# ---------------------------------------------------------------------- optimisation
class StepTimer:
    """Seconds per named stage, summed over steps (synchronising CUDA first when `sync`)."""

    def __init__(self, sync: bool = False):
        self.sync = sync
        self.totals: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        yield
        if self.sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        self.totals[name] += time.perf_counter() - t


@dataclass
class Anchors:
    views: list[int]
    cameras: Cameras
    images: Tensor  # [A,3,H,W] renders after prior removal
    masks: Tensor  # [A,H,W] bool
    targets: Tensor  # [A,3,H,W]


class PartEditor:
    """The part's Gaussians as parameters, their Adam optimizers, the densification state, the loss history.

    Args:
        scene: the input scene (any device). mask: [N] bool, the part. cameras: the ring (SDS views).
        guidance: a loaded `Guidance` (or None when lambda_sds is 0). cfg: EditConfig.
    """

    def __init__(self, scene: GaussianScene, mask: Tensor, cameras: Cameras, guidance, cfg: EditConfig):
        from gsplat.strategy import DefaultStrategy

        cfg = replace(cfg, cameras=resolve_ring(cfg.cameras, scene, mask))  # concrete centre, radius, up
        self.cfg, self.scene, self.guidance, self.cameras = cfg, scene, guidance, cameras
        self.mask = mask.to(scene.device)
        self.device = scene.device
        self.background = torch.tensor(cfg.background, dtype=scene.means.dtype, device=self.device)
        self.sh_degree = scene.sh_degree
        keep = ~self.mask
        self.rest = activated(scene.means[keep], scene.quats[keep], scene.log_scales[keep],
                               scene.opacity_logits[keep], scene.sh[keep])
        self.rest_index = keep.nonzero()[:, 0]
        self.rest_cache = RestCache()
        src = self.mask.nonzero()[:, 0]
        sh = scene.sh[src]
        if cfg.prior_removal != "none":
            sh = remove_prior(sh, torch.ones(len(src), dtype=torch.bool), cfg.prior_removal)
        raw = {"means": scene.means[src], "quats": scene.quats[src], "scales": scene.log_scales[src],
               "opacities": scene.opacity_logits[src], "sh0": sh[:, :1]}
        if sh.shape[1] > 1:
            raw["shN"] = sh[:, 1:]
        o = cfg.optim
        lrs = {"means": o.lr_means, "quats": o.lr_rotation, "scales": o.lr_scale, "opacities": o.lr_opacity,
               "sh0": o.lr_color, "shN": o.lr_color * o.sh_rest_factor}
        d = cfg.densify
        # frozen positions still need gradients when densifying (the 2D means' gradient is the
        # criterion); they get an optimizer for gsplat's bookkeeping that is never stepped
        self.frozen = {k for k, lr in lrs.items() if lr <= 0 and k in raw}
        grad = {k: lrs[k] > 0 or (k == "means" and d.enabled) for k in raw}
        self.params = {k: torch.nn.Parameter(v.detach().clone().float(), requires_grad=grad[k]) for k, v in raw.items()}
        self.optimizers = {k: (adam([p], lr=lrs[k], eps=1e-15) if k not in self.frozen
                               else torch.optim.SGD([p], lr=0.0)) for k, p in self.params.items() if p.requires_grad}
        self.strategy = DefaultStrategy(prune_opa=d.prune_opa, grow_grad2d=d.grow_grad2d, grow_scale3d=d.grow_scale3d,
                                        prune_scale3d=d.prune_scale3d, refine_start_iter=d.start,
                                        refine_stop_iter=d.stop, refine_every=d.every, reset_every=10**9)
        self.state = self.strategy.initialize_state(scene_scale=scene_radius(scene))
        self.state["src"] = src.clone()  # input index each part Gaussian descends from (kept by gsplat's ops)
        self.n_part_input = len(src)
        self.step_count = 0
        self.last_views: list[int] = []
        self.history: list[dict[str, float]] = []
        self.nonfinite_steps = self._nonfinite_run = 0  # steps skipped for NaN/inf gradients: all, in a row
        self.timer = StepTimer(sync=cfg.profile)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.noise_generator = (torch.Generator(device=guidance.device).manual_seed(cfg.seed)
                                if guidance is not None else None)
        center = torch.tensor(cfg.cameras.center)
        self.azimuth, self.elevation = camera_angles(cameras, center, cfg.cameras.up, cfg.cameras.front_azimuth_deg)
        self.anchors: Anchors | None = None
        self._cond_latents: dict[int, Tensor] = {}

    # --- views of the current state
    def part_tensors(self) -> dict[str, Tensor]:
        """Activated part tensors (differentiable)."""
        sh = _sh(self.params)
        p = self.params
        return activated(p["means"], p["quats"], p["scales"], p["opacities"], sh)

    def render(self, cameras: Cameras, part: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor, dict]:
        return render_part(self.rest, part if part is not None else self.part_tensors(), cameras,
                           sh_degree=self.sh_degree, background=self.background, backend=self.cfg.backend,
                           rest_cache=self.rest_cache)

    def original_part(self) -> dict[str, Tensor]:
        s, m = self.scene, self.mask
        return activated(s.means[m], s.quats[m], s.log_scales[m], s.opacity_logits[m], s.sh[m])

    @torch.no_grad()
    def remove(self, drop: Tensor) -> int:
        """Remove part Gaussians [P] bool (before or between steps); returns how many."""
        from gsplat.strategy.ops import remove

        n = int(drop.sum())
        if n:
            remove(self.params, self.optimizers, self.state, drop.to(self.device))
        return n

    def set_anchors(self, anchors: Anchors | None) -> None:
        self.anchors = anchors

    # --- one step
    def _sds(self, rgb: Tensor, coverage: Tensor, views: list[int]) -> Tensor:
        g, cfg, t = self.guidance, self.cfg, self.timer
        images = rgb.permute(0, 3, 1, 2)
        mask = dilate((coverage.detach() > 0.5).float(), cfg.mask_dilation)[:, None]
        with t("encode"):
            x = g.check_images(images.clamp(0, 1))
            if tuple(mask.shape[-2:]) != tuple(x.shape[-2:]):
                mask = F.interpolate(mask, size=x.shape[-2:], mode="nearest")
            latents = g.encode_images(x, generator=self.noise_generator)
        extra = {}
        if g.needs_image_condition:
            extra["image_cond_latents"] = torch.cat([self._condition(v) for v in views])
        azimuth = self.azimuth[views] if cfg.guidance.view_dependent else None
        with t("diffusion"):
            loss = g.loss(latents=latents, prompt=sds_prompt(cfg), negative_prompt=cfg.guidance.negative_prompt,
                          mask=mask.to(g.device), azimuth=azimuth, elevation=self.elevation[views],
                          generator=self.noise_generator, **extra)
        return loss.to(self.device)

    def _nonfinite(self, loss: Tensor, use_sds: bool) -> bool:
        """Whether this step's loss or gradients hold NaN/inf (then it is skipped: no Adam update, no
        densification); `max_nonfinite_steps` of them in a row stop the edit with an error."""
        bad = (use_sds and self.guidance.last.get("nonfinite", 0) > 0) or not bool(torch.isfinite(loss))
        bad = bad or any(p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in self.params.values())
        self.nonfinite_steps += int(bad)
        self._nonfinite_run = self._nonfinite_run + 1 if bad else 0
        if self._nonfinite_run >= self.cfg.max_nonfinite_steps:
            raise FloatingPointError(
                f"{self._nonfinite_run} edit steps in a row had NaN/inf gradients (step {self.step_count + 1}): "
                "try guidance.dtype=float32, a lower guidance.guidance_scale or guidance.options.grad_clip")
        return bad

    @torch.no_grad()
    def _condition(self, view: int) -> Tensor:
        """InstructPix2Pix conditioning latents of the original scene at ring view `view` (cached)."""
        if view not in self._cond_latents:
            rgb, _, _ = self.render(self.cameras[view], self.original_part())
            self._cond_latents[view] = self.guidance.encode_condition(rgb.permute(0, 3, 1, 2).clamp(0, 1))
        return self._cond_latents[view]

    def step(self) -> dict[str, float]:
        """One optimisation step; returns {"loss", "sds", "anchor", "gaussians"}."""
        cfg, t = self.cfg, self.timer
        views = torch.randint(len(self.cameras), (cfg.batch_size,), generator=self.generator).tolist()
        self.last_views = views  # ring views of this step's SDS (the live view shows the first)
        use_sds = cfg.lambda_sds > 0 and self.guidance is not None
        use_anchor = cfg.lambda_anchor > 0 and self.anchors is not None and len(self.anchors.views) > 0
        cams = self.cameras[views] if use_sds else None
        if use_anchor:
            cams = self.anchors.cameras if cams is None else Cameras.cat([cams, self.anchors.cameras])
        if self.guidance is not None:
            self.guidance.set_step(self.step_count, max(cfg.steps, 1))
        densify = cfg.densify.enabled and self.step_count < cfg.densify.stop
        loss = sds = anchor = torch.zeros((), device=self.device)
        if cams is not None:
            with t("render"):
                rgb, cov, meta = self.render(cams)
            if densify:
                meta["means2d"].retain_grad()
            b = cfg.batch_size if use_sds else 0
            if use_sds:
                sds = self._sds(rgb[:b], cov[:b], views)
            with t("backward_model"):  # the losses and their gradient w.r.t. the rendered pixels
                if use_anchor:
                    m = self.anchors.masks[:, :, :, None].to(rgb)
                    diff = (rgb[b:] - self.anchors.targets.permute(0, 2, 3, 1).to(rgb)).abs() * m
                    anchor = diff.sum() / (3 * m.sum()).clamp_min(1.0)
                loss = cfg.lambda_sds * sds + cfg.lambda_anchor * anchor
                grad_rgb = torch.autograd.grad(loss, rgb)[0] if loss.requires_grad else None
            with t("backward_render"):  # pixels -> Gaussian parameters
                if grad_rgb is not None:
                    rgb.backward(grad_rgb)
        skip = self._nonfinite(loss, use_sds)
        with t("optimizer"):
            for name, opt in self.optimizers.items():
                if name not in self.frozen and not skip:
                    opt.step()
                opt.zero_grad(set_to_none=True)
            if densify and not skip and cams is not None and meta["means2d"].grad is not None:
                self._densify(meta)
        self.step_count += 1
        record = {"step": self.step_count, "loss": loss.item(), "sds": sds.item(), "anchor": anchor.item(),
                  "gaussians": int(len(self.params["means"])), "skipped": skip}
        self.history.append(record)
        return record

    def _densify(self, meta: dict) -> None:
        """Run DefaultStrategy's post-backward on the part's slice of the render's means2d / radii."""
        start = meta["means2d"].shape[1] - len(self.params["means"])  # the part comes last
        proxy = torch.zeros_like(meta["means2d"][:, start:]).requires_grad_(True)
        proxy.grad = meta["means2d"].grad[:, start:].detach().float()
        info = {"means2d": proxy, "radii": meta["radii"][:, start:], "width": meta["width"],
                "height": meta["height"], "n_cameras": meta["n_cameras"], "gaussian_ids": None}
        self.strategy.step_post_backward(self.params, self.optimizers, self.state, self.step_count, info)

    # --- results
    @torch.no_grad()
    def edited_scene(self) -> GaussianScene:
        """The whole scene: untouched Gaussians bit-for-bit, the part's current state; ordered by the
        input index each Gaussian descends from (so without densification indices are unchanged);
        extras, label field and certainty follow that index."""
        s = self.scene
        src = torch.cat([self.rest_index, self.state["src"].to(self.device)])
        order = torch.argsort(src, stable=True)
        p = self.params
        sh = _sh(p)
        n_rest = len(self.rest_index)

        def merged(rest: Tensor, part: Tensor) -> Tensor:
            return torch.cat([rest, part.detach().to(rest.dtype)])[order]

        keep = self.rest_index
        pick = lambda t: None if t is None else t[src[order]]  # noqa: E731
        out = GaussianScene(
            means=merged(s.means[keep], p["means"]), quats=merged(s.quats[keep], p["quats"]),
            log_scales=merged(s.log_scales[keep], p["scales"]),
            opacity_logits=merged(s.opacity_logits[keep], p["opacities"]), sh=merged(s.sh[keep], sh),
            label_sh=pick(s.label_sh), certainty=pick(s.certainty),
            extras={k: v[src[order]] for k, v in s.extras.items()}, comments=list(s.comments))
        assert len(out) == n_rest + len(p["means"])
        return out

    def counts(self) -> dict[str, int]:
        """Gaussians of the part: input, output, removed (input ones with no descendant), added
        (descendants beyond the first), changed (first descendants whose parameters differ)."""
        src = self.state["src"].cpu()
        uniq, first = np.unique(src.numpy(), return_index=True)
        s, p = self.scene, self.params
        idx = torch.as_tensor(uniq, dtype=torch.long)
        first = torch.as_tensor(first, dtype=torch.long)
        sh = _sh(p)
        diff = torch.zeros(len(idx), dtype=torch.bool)
        for a, b in ((s.means, p["means"]), (s.quats, p["quats"]), (s.log_scales, p["scales"]),
                     (s.opacity_logits, p["opacities"]), (s.sh, sh)):
            x, y = a[idx.to(a.device)].cpu().float(), b.detach()[first.to(b.device)].cpu().float()
            diff |= (x != y).reshape(len(idx), -1).any(dim=1)
        return {"part_input": self.n_part_input, "part_output": len(src), "removed": self.n_part_input - len(uniq),
                "added": len(src) - len(uniq), "changed": int(diff.sum()), "outside": len(self.rest_index)}


# ---------------------------------------------------------------------- interruption
class StopRequest:
    """While active, the first SIGINT / SIGTERM only sets `requested` (the loop stops after its
    step and the result is still written); a second one raises KeyboardInterrupt."""

    def __init__(self):
        self.requested: str | None = None
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:  # only sets the flag: the loop reports it
        name = signal.Signals(signum).name
        if self.requested is not None:
            raise KeyboardInterrupt(f"second {name}")
        self.requested = name

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------------- the pipeline
@dataclass
class EditResult:
    out: Path
    scene: Path
    summary: dict


def anchor_stage(editor: PartEditor, cfg: EditConfig, method: str) -> tuple[Anchors | None, int]:
    """Pick the anchor views, render them with the prior removed, edit them in 2D, drop the part
    Gaussians whose target is background (RoMaP) and hand the anchors to the editor.
    Returns (anchors or None, number of Gaussians removed)."""
    if method == "none" or (cfg.anchors.count == 0 and not cfg.anchors.views):
        return None, 0
    with torch.no_grad():
        if cfg.anchors.views:
            views = list(cfg.anchors.views)
        else:
            cover = torch.cat([(editor.render(editor.cameras[i : i + 8])[1] > 0.5).flatten(1).sum(1).float().cpu()
                               for i in range(0, len(editor.cameras), 8)])
            views = pick_anchor_views(cover, editor.azimuth, cfg.anchors.count, cfg.anchors.min_separation_deg)
        cams = editor.cameras[views]
        rgb, cov, _ = editor.render(cams)
        masks = dilate((cov > 0.5).float(), cfg.anchors.mask_dilation) > 0.5
        images = rgb.permute(0, 3, 1, 2).clamp(0, 1)
        cond = None
        if method == "ip2p":
            cond = editor.render(cams, editor.original_part())[0].permute(0, 3, 1, 2).clamp(0, 1)
        targets = make_anchor_targets(editor.guidance, images, masks[:, None].float(), cfg, method,
                                      azimuth=editor.azimuth[views] if cfg.guidance.view_dependent else None,
                                      elevation=editor.elevation[views], cond_images=cond).to(images)
    anchors = Anchors(views=views, cameras=cams, images=images, masks=masks, targets=targets)
    removed = 0
    if cfg.anchors.remove_background:
        drop = background_gaussians(editor.params["means"].detach(), cams, masks, targets, editor.background,
                                    cfg.anchors.background_tolerance)
        removed = editor.remove(drop)
    editor.set_anchors(anchors)
    return anchors, removed


def _anchor_method(cfg: EditConfig, guidance) -> str:
    """anchors.method, "auto" resolved by what the guidance kind declares (`Guidance.anchor_method`)."""
    method = cfg.anchors.method
    kind, own = getattr(guidance, "kind", None), getattr(guidance, "anchor_method", None)
    if method == "auto":
        method = own or "slamp"
    if method == "slamp" and (own is None or guidance.needs_image_condition):
        raise ValueError(f"anchors.method 'slamp' needs text-conditioned guidance (sds, rfds), got {kind!r}; "
                         "use 'ip2p' or 'none'")
    if method == "ip2p" and own != "ip2p":
        raise ValueError(f"anchors.method 'ip2p' needs an InstructPix2Pix model, got guidance kind {kind!r}")
    return method


def prepare_edit(cfg: EditConfig, *, progress: bool = True) -> tuple[PartEditor, str]:
    """Everything before the anchors, each failure one clear error: files, scene, cameras, visibility,
    the part's 3D mask, the guidance, image size. Writes only 3D-GALP's outputs (OUT/segment/) when it
    segments. Returns (editor, anchor method)."""
    check_inputs(cfg)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    scene = load_scene(cfg.scene, device)
    first = resolve_ring(cfg.cameras, scene)  # the part is not known yet: 3D-GALP segments from these views
    cameras = make_cameras(first, scene)
    seen = visible_gaussians(scene.means, cameras)
    if not bool(seen.any()):
        raise ValueError(f"no Gaussian of {cfg.scene} is in view of any of the {len(cameras)} cameras "
                         "(check cameras.path / radius / center / up)")
    mask = segment_part(scene, cfg, cameras, work_dir=Path(cfg.out) / "segment", progress=progress)
    cfg = replace(cfg, cameras=resolve_ring(cfg.cameras, scene, mask))
    if cfg.cameras != first:
        cameras = make_cameras(cfg.cameras, scene)
    if not bool(part_coverage(scene, mask, cameras, backend=cfg.backend).any()):  # occlusion counts
        c, part = cfg.cameras, scene.subset(mask.cpu())
        where = "the camera file" if c.path else (f"a ring of radius {c.radius:.3g} around "
                                                  f"[{', '.join(f'{v:.3g}' for v in c.center)}]")
        raise ValueError(f"part {cfg.part!r} ({int(mask.sum())} Gaussians, centre "
                         f"[{', '.join(f'{v:.3g}' for v in part.center(0.01).tolist())}], radius "
                         f"{scene_radius(part):.3g}; the scene's radius is {scene_radius(scene):.3g}) is in view of "
                         f"none of the {len(cameras)} cameras ({where}), or hidden in all; set cameras.center=part "
                         "for a ring around the part, or cameras.radius (and cameras.up) to frame it")
    bad = [v for v in (cfg.anchors.views or []) if not 0 <= v < len(cameras)]
    if bad:
        raise ValueError(f"anchors.views {bad} are not camera indices (0..{len(cameras) - 1})")
    guidance = load_edit_guidance(cfg.guidance, device)
    if cfg.guidance.resolution is None:
        k = guidance.size_multiple
        if cameras.width % k or cameras.height % k:
            raise ValueError(f"cameras are {cameras.width}x{cameras.height}; this model needs multiples of {k} "
                             "(set cameras.width/height or guidance.resolution)")
    method = _anchor_method(cfg, guidance)
    return PartEditor(scene, mask, cameras, guidance, cfg), method


def run_edit(cfg: EditConfig, *, callback: Callable[[PartEditor, dict], None] | None = None,
             progress: bool = True) -> EditResult:
    """Run the whole pipeline and write the run folder `cfg.out`; returns its paths and summary.

    `callback(editor, record)` runs after every step (tests use it to send signals).
    """
    from tqdm.auto import tqdm

    from gendistill.config import to_yaml
    from gendistill.core.io import atomic_path
    from gendistill.splat_edit import report

    t_start = time.perf_counter()
    editor, method = prepare_edit(cfg, progress=progress)
    cfg = editor.cfg  # the ring's centre, radius and up made concrete
    scene, guidance = editor.scene, editor.guidance
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "config.yaml") as tmp:
        tmp.write_text(to_yaml(cfg))
    report.write_mask(out, cfg.part, editor.mask)
    t_setup = time.perf_counter()
    removed_bg = 0
    with StopRequest() as stop:  # installed until the result and the report are written
        anchors, removed_bg = anchor_stage(editor, cfg, method)
        if anchors is not None:
            report.write_anchors(out, anchors)
        t_loop = time.perf_counter()
        bar = tqdm(range(cfg.steps), desc="edit", disable=not progress, dynamic_ncols=True)
        for _ in bar:
            if stop.requested:
                break
            record = editor.step()
            if editor.step_count % max(cfg.log_every, 1) == 0:
                bar.set_postfix(loss=f"{record['loss']:.4g}", n=record["gaussians"])
            if callback is not None:
                callback(editor, record)
        bar.close()
        interrupted = stop.requested or False
        if interrupted:  # printed here, not in the handler (tqdm writes to the same stream)
            print(f"{interrupted}: stopped after step {editor.step_count}; writing the result (again to abort)",
                  file=sys.stderr, flush=True)
        t_end = time.perf_counter()
        edited = editor.edited_scene()
        scene_path = edited.save_ply(out / "edited.ply")
        exported = {"ply": str(scene_path)}
        for fmt in dict.fromkeys(cfg.export):  # the other formats asked for, beside it
            if fmt != "ply":
                path = out / f"edited{SCENE_FORMATS[fmt].suffixes[0]}"
                write_scene(edited, path, fmt)
                exported[fmt] = str(path)
        summary = {
            "scene": str(cfg.scene), "part": cfg.part, "prompt": cfg.prompt, "edit_prompt": cfg.edit_prompt,
            "steps_planned": cfg.steps, "steps": editor.step_count, "interrupted": interrupted,
            "steps_skipped_nonfinite": editor.nonfinite_steps,
            "seconds": {"total": None, "setup": t_setup - t_start, "optimisation": t_end - t_loop,
                        "per_step": (t_end - t_loop) / max(editor.step_count, 1)},
            "timings_per_step": {k: v / max(editor.step_count, 1) for k, v in editor.timer.totals.items()},
            "gaussians": {"input": len(scene), "output": len(edited), **editor.counts(),
                          "removed_background": removed_bg},
            "anchor_views": anchors.views if anchors is not None else [], "anchor_method": method,
            "guidance": {"kind": guidance.kind, "model": str(cfg.guidance.model)},
            "device": str(editor.device), "exported": exported, "config": asdict(cfg),
        }
        report.write_summary(out, summary)  # a complete, loadable result exists from here on
        summary = report.write_report(out, cfg, editor, summary, t_start)
    print(f"edited scene: {scene_path}\nreport: {out / 'report.html'}", file=sys.stderr)
    return EditResult(out=out, scene=scene_path, summary=summary)
