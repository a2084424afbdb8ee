"""Rendering a scene as a frozen rest plus the part being edited (`render_part`), with the part's
coverage as an extra channel, and the per-view cache of the rest (`RestCache`) that makes a CPU
edit step cost little more than rendering the part."""

from __future__ import annotations

import torch
from torch import Tensor

from gendistill.core.cameras import Cameras
from gendistill.core.render import rasterize, select_backend
from gendistill.core.render.rasterize import compositor, project_features, projector
from gendistill.core.render.sh import eval_sh
from gendistill.core.render.torch_backend import boxes_touch, pixel_votes, tile_boxes, touched_tiles

__all__ = ["activated", "RestCache", "render_part"]


def activated(means, quats, log_scales, opacity_logits, sh) -> dict[str, Tensor]:
    """The tensors `render_part` takes: scales exp(log_scales), opacities sigmoid(logits)."""
    return {"means": means, "quats": quats, "scales": log_scales.exp(), "opacities": torch.sigmoid(opacity_logits),
            "sh": sh}


TILE = 16  # compositor tile size (pixels)


def pixel_boxes(means2d: Tensor, radii: Tensor, width: int, height: int) -> Tensor:
    """[..., 4] pixel boxes (x0, y0, x1, y1), exclusive ends, holding every pixel where a Gaussian can
    composite: its radii box (which bounds the ellipse where alpha >= 1/255 for opacities up to 1,
    as `activated` gives) grown by one pixel against rounding; empty for culled Gaussians."""
    return tile_boxes(means2d, radii + (radii > 0).to(radii.dtype), 1, width, height)


class RestCache:
    """The frozen rest per camera, kept while it fits in `max_bytes`: its 2D Gaussians
    (`project_features` without the batch axis), their `pixel_boxes` (empty for Gaussians that
    neither composite into nor end any pixel of the view) and its render alone. The rest never
    changes during an edit and the views come from a fixed ring, so after the first visit of a view
    a step projects only the part and composites only the pixels the part can reach, with the rest
    Gaussians that show there; every other pixel is the rest's render, exactly. One cache serves one rest,
    SH degree and background (`PartEditor` owns one)."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes, self.bytes, self.entries = max_bytes, 0, {}

    @staticmethod
    def key(cameras: Cameras, i: int) -> tuple:
        return (cameras.viewmats[i].cpu().numpy().tobytes(), cameras.Ks[i].cpu().numpy().tobytes(),
                cameras.width, cameras.height)

    def add(self, key: tuple, entry: dict[str, Tensor]) -> None:
        """Keep a copy of `entry` if it fits (and `key` is new)."""
        size = sum(t.numel() * t.element_size() for t in entry.values())
        if key not in self.entries and self.bytes + size <= self.max_bytes:
            self.entries[key] = {k: v.clone() for k, v in entry.items()}
            self.bytes += size


@torch.no_grad()
def _rest_views(rest: dict[str, Tensor], cams: Cameras, sh_degree: int, cache: RestCache | None,
                composite, project, background: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """The rest in `cams`: `project_features` plus "boxes" ([C, n_rest, ...] each), from `cache` where
    it can, and which cameras have a cached render alone ([C] bool; those renders as "image")."""
    keys = [RestCache.key(cams, i) for i in range(len(cams))]
    entries = {i: cache.entries[k] for i, k in enumerate(keys) if cache is not None and k in cache.entries}
    missing = [i for i in range(len(cams)) if i not in entries]
    if missing:
        sub = cams[missing]
        w, h = sub.width, sub.height
        g = project_features(rest["means"], rest["quats"], rest["scales"], rest["opacities"], rest["sh"],
                             sub.viewmats, sub.Ks, w, h, sh_degree=sh_degree, project=project)
        g["boxes"] = pixel_boxes(g["means2d"], g["radii"], w, h).int()
        per_view = sum(v[0].numel() * v.element_size() for v in g.values()) + h * w * 4 * g["colors"].element_size()
        if cache is not None and cache.bytes + per_view * len(missing) <= cache.max_bytes:
            feats = torch.cat([g["colors"], g["colors"].new_zeros(*g["colors"].shape[:2], 1)], dim=-1)
            g["image"], _ = composite(g["means2d"], g["conics"], feats, g["opacities"], g["depths"], g["radii"], w, h,
                                      background.expand(len(sub), 4).contiguous(), TILE)
            # a rest Gaussian that neither composites into nor ends a pixel of the rest alone does neither
            # with the part in front or behind (the part only lowers T): it never shows in this view
            counts, ends, _ = pixel_votes(g["means2d"], g["conics"], g["opacities"], g["depths"], g["radii"], w, h,
                                          tile_size=TILE)
            g["boxes"] = g["boxes"] * ((counts + ends) > 0)[..., None]
        for j, i in enumerate(missing):
            entries[i] = {k: v[j] for k, v in g.items()}
            if "image" in g:
                cache.add(keys[i], entries[i])
    cached = torch.tensor([cache is not None and k in cache.entries for k in keys])
    out = {k: torch.stack([entries[i][k] for i in range(len(cams))]) for k in entries[0] if k != "image"}
    if cached.any():
        some = int(cached.nonzero()[0])  # a stand-in where a camera has no render alone (all its tiles are composited)
        out["image"] = torch.stack([entries[i if cached[i] else some]["image"] for i in range(len(cams))])
    return out, cached


def render_part(rest: dict[str, Tensor], part: dict[str, Tensor], cameras: Cameras, *, sh_degree: int,
                background: Tensor, backend: str = "auto", rest_cache: RestCache | None = None
                ) -> tuple[Tensor, Tensor, dict]:
    """Render the frozen rest and the part together, with the part's coverage as a 4th channel.

    rest / part: activated tensors (means [n,3], quats [n,4], scales [n,3], opacities [n], sh [n,K,3]);
    the part comes last in the render (meta["means2d"][:, -n_part:] is the part). background: [3].
    With the "cpu" and "torch" backends the rest is projected apart from the part, without autograd,
    and with `rest_cache` (see `RestCache`) only the pixels the part can reach are composited; gsplat
    projects and composites everything in its fused kernels. The result is the same either way.
    Returns rgb [C,H,W,3], coverage [C,H,W] (sum of the part's alpha * T), meta (means2d, radii,
    width, height, n_cameras at least).
    """
    cams = cameras.to(rest["means"].device, rest["means"].dtype)
    part = {k: v.to(rest["means"].dtype) for k, v in part.items()}
    n_rest, n_part = len(rest["means"]), len(part["means"])
    bg = torch.cat([background.to(rest["means"]), rest["means"].new_zeros(1)]).expand(len(cams), 4).contiguous()
    name = select_backend(backend, rest["means"])
    composite, project = compositor(name), projector(name)
    if composite is None:
        cat = {k: torch.cat([rest[k], part[k]]) for k in ("means", "quats", "scales", "opacities", "sh")}
        campos = torch.linalg.inv(cams.viewmats)[:, :3, 3]
        rgb = torch.clamp_min(eval_sh(sh_degree, cat["sh"][None], cat["means"][None] - campos[:, None]) + 0.5, 0.0)
        flag = torch.cat([rest["means"].new_zeros(n_rest), part["means"].new_ones(n_part)])
        feats = torch.cat([rgb, flag[None, :, None].expand(len(cams), -1, 1)], dim=-1)
        out, _, meta = rasterize(cat["means"], cat["quats"], cat["scales"], cat["opacities"], feats, cams.viewmats,
                                 cams.Ks, cams.width, cams.height, backgrounds=bg, backend=backend)
        return out[..., :3], out[..., 3], meta
    r, cached = _rest_views(rest, cams, sh_degree, rest_cache, composite, project, bg[0])
    q = project_features(part["means"], part["quats"], part["scales"], part["opacities"], part["sh"], cams.viewmats,
                         cams.Ks, cams.width, cams.height, sh_degree=sh_degree, project=project)
    hot = touched_tiles(pixel_boxes(q["means2d"], q["radii"], cams.width, cams.height), cams.width, cams.height)
    hot |= ~cached.to(hot.device)[:, None, None]  # no render of the rest alone: composite everything
    near = boxes_touch(r["boxes"], hot)  # [C, n_rest]: rest Gaussians that can reach a composited pixel
    keep = near.any(0).nonzero()[:, 0]
    g = {k: torch.cat([r[k][:, keep], q[k]], dim=1) for k in q}
    g["radii"] = g["radii"] * torch.cat([near[:, keep], near.new_ones(len(cams), n_part)], 1)[..., None]
    flag = torch.cat([g["colors"].new_zeros(len(keep)), g["colors"].new_ones(n_part)])
    feats = torch.cat([g["colors"], flag[None, :, None].expand(len(cams), -1, 1)], dim=-1)
    out, _ = composite(g["means2d"], g["conics"], feats, g["opacities"], g["depths"], g["radii"], cams.width,
                       cams.height, bg, TILE, pixel_mask=hot)
    if "image" in r:
        out = torch.where(hot[..., None], out, r["image"].to(out))
    meta = {"means2d": g["means2d"], "radii": g["radii"], "width": cams.width, "height": cams.height,
            "n_cameras": len(cams)}
    return out[..., :3], out[..., 3], meta
