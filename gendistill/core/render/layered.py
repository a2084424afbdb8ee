"""Layered rendering: a frozen set of Gaussians (the rest) rendered once per view and cached
(`RestCache`), and a changing set (the part) composited over it (`render_part`), with the part's
coverage as an extra channel. An edit step then costs little more than rendering the part.

Backends with `frozen_layer` / `composite_with_layer` (cpu) cache each view as a `FrozenLayer`;
backends with a `composite` (torch, plugins) cache the rest's 2D Gaussians and render and composite
only the pixels the part can reach; others (gsplat) render the scene whole. The result is the same.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gendistill.core.cameras import Cameras

from .backends import RenderBackend, get_backend, project_features
from .torch_backend import boxes_touch, pixel_votes, tile_boxes, touched_tiles

__all__ = ["RestCache", "render_part"]


TILE = 16  # compositor tile size (pixels)


def pixel_boxes(means2d: Tensor, radii: Tensor, width: int, height: int) -> Tensor:
    """[..., 4] pixel boxes (x0, y0, x1, y1), exclusive ends, holding every pixel where a Gaussian can
    composite: its radii box (which bounds the ellipse where alpha >= 1/255 for opacities up to 1,
    as `activated` gives) grown by one pixel against rounding; empty for culled Gaussians."""
    return tile_boxes(means2d, radii + (radii > 0).to(radii.dtype), 1, width, height)


class RestCache:
    """The frozen rest per camera, kept while it fits in `max_bytes`. With a layer backend ("cpu") an entry
    is the view's `FrozenLayer` (its Gaussians that show there, sorted, and its render alone); with a
    compositing one ("torch"), its 2D Gaussians (`project_features` without the batch axis), their `pixel_boxes` (empty
    for Gaussians that never show) and its render alone. The rest never changes during an edit and
    the views come from a fixed ring, so after the first visit of a view a step projects only the part
    and composites only the pixels the part can reach, with the rest Gaussians that show there; every
    other pixel is the rest's render, exactly. One cache serves one rest, SH degree, background and
    backend (the editor's `PartEditor` owns one)."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes, self.bytes, self.entries = max_bytes, 0, {}

    @staticmethod
    def key(cameras: Cameras, i: int) -> tuple:
        return (cameras.viewmats[i].cpu().numpy().tobytes(), cameras.Ks[i].cpu().numpy().tobytes(),
                cameras.width, cameras.height)

    def fits(self, nbytes: int) -> bool:
        return self.bytes + nbytes <= self.max_bytes

    def add(self, key: tuple, entry, nbytes: int) -> None:
        """Keep `entry` (not copied) if it fits and `key` is new."""
        if key not in self.entries and self.fits(nbytes):
            self.entries[key] = entry
            self.bytes += nbytes


def _missing(cams: Cameras, cache: RestCache) -> tuple[list, dict, list[int]]:
    """The cache keys of `cams`, their entries found ({camera: entry}) and the cameras without one."""
    keys = [RestCache.key(cams, i) for i in range(len(cams))]
    found = {i: cache.entries[k] for i, k in enumerate(keys) if k in cache.entries}
    return keys, found, [i for i in range(len(cams)) if i not in found]


@torch.no_grad()
def _rest_alone(g: dict[str, Tensor], composite, width: int, height: int, background: Tensor,
                votes_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The render [C,H,W,4] of projected Gaussians `g` ([C, n, ...] as `project_features`, colors with
    the zero coverage channel) over background [4], and which of them show ([C, n] bool), decided in
    `votes_dtype` (the precision `composite` decides in). A Gaussian that neither composites into nor
    ends a pixel of the rest alone does neither with the part in front or behind (the part only
    lowers T): it never shows in that view."""
    image, _ = composite(g["means2d"], g["conics"], g["colors"], g["opacities"], g["depths"], g["radii"], width,
                         height, background.expand(len(g["radii"]), 4).contiguous(), TILE)
    counts, ends, _ = pixel_votes(*(g[k].to(votes_dtype) for k in ("means2d", "conics", "opacities", "depths")),
                                  g["radii"], width, height, tile_size=TILE)
    return image, (counts + ends) > 0


def _project(gs: dict[str, Tensor], cams: Cameras, sh_degree: int, backend: RenderBackend,
             coverage: float) -> dict[str, Tensor]:
    """`project_features` of activated Gaussians `gs` in `cams` by `backend`, colors with a coverage channel."""
    g = project_features(backend, gs["means"], gs["quats"], gs["scales"], gs["opacities"], gs["sh"], cams.viewmats,
                         cams.Ks, cams.width, cams.height, sh_degree=sh_degree)
    g["colors"] = torch.cat([g["colors"], torch.full_like(g["colors"][..., :1], coverage)], dim=-1)
    return g


def _view_bytes(rest: dict[str, Tensor], cams: Cameras) -> int:
    """An upper bound on the cache bytes of one view of the rest (all its Gaussians showing)."""
    return len(rest["means"]) * 8 * (16 + 8) + cams.height * cams.width * 4 * 8


@torch.no_grad()
def _rest_layers(rest: dict[str, Tensor], cams: Cameras, sh_degree: int, cache: RestCache, backend: RenderBackend,
                 background: Tensor) -> list | None:
    """The rest's `FrozenLayer` in each of `cams`, from `cache` where it can; None when the missing
    ones would not fit in it (the caller renders everything instead)."""
    keys, layers, missing = _missing(cams, cache)
    if missing and not cache.fits(_view_bytes(rest, cams) * len(missing)):
        return None
    for i in missing:  # one view at a time: the float64 votes of a whole ring at once take ~10x the memory
        g = _project(rest, cams[[i]], sh_degree, backend, 0.0)
        image, shows = _rest_alone(g, backend.composite, cams.width, cams.height, background, torch.float64)
        layers[i] = backend.frozen_layer(*(g[k][0] for k in ("means2d", "conics", "colors", "opacities", "depths", "radii")),
                                 image=image[0], keep=shows[0], tile_size=TILE)
        cache.add(keys[i], layers[i], layers[i].nbytes)
    return [layers[i] for i in range(len(cams))]


@torch.no_grad()
def _rest_views(rest: dict[str, Tensor], cams: Cameras, sh_degree: int, cache: RestCache, backend: RenderBackend,
                background: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """The rest in `cams`: `project_features` plus "boxes" ([C, n_rest, ...] each), from `cache` where
    it can, and which cameras have a render alone ([C] bool; those renders as "image")."""
    keys, entries, missing = _missing(cams, cache)
    if missing:
        sub = cams[missing]
        g = _project(rest, sub, sh_degree, backend, 0.0)
        g["boxes"] = pixel_boxes(g["means2d"], g["radii"], sub.width, sub.height).int()
        per_view = sum(v[0].numel() * v.element_size() for v in g.values()) + sub.height * sub.width * 4 * 8
        if cache.fits(per_view * len(missing)):
            g["image"], shows = _rest_alone(g, backend.composite, sub.width, sub.height, background,
                                            g["means2d"].dtype)
            g["boxes"] = g["boxes"] * shows[..., None]
        for j, i in enumerate(missing):
            entries[i] = {k: v[j] for k, v in g.items()}
            if "image" in g:
                entries[i] = {k: v.clone() for k, v in entries[i].items()}
                cache.add(keys[i], entries[i], per_view)
    cached = torch.tensor([k in cache.entries for k in keys])
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
    With `rest_cache` and a backend that composites (cpu, torch), the rest is projected apart from the
    part, without autograd, and cached per view (see `RestCache`), and only the pixels the part can
    reach are composited; otherwise (and with gsplat, whose kernels fuse projection and compositing)
    the scene is rendered whole. The result is the same either way.
    Returns rgb [C,H,W,3], coverage [C,H,W] (sum of the part's alpha * T), meta (means2d, radii,
    width, height, n_cameras at least).
    """
    cams = cameras.to(rest["means"].device, rest["means"].dtype)
    part = {k: v.to(rest["means"].dtype) for k, v in part.items()}
    bg = torch.cat([background.to(rest["means"]), rest["means"].new_zeros(1)]).expand(len(cams), 4).contiguous()
    be = get_backend(backend, rest["means"])
    out = None
    if rest_cache is not None and be.frozen_layer is not None:
        layers = _rest_layers(rest, cams, sh_degree, rest_cache, be, bg[0])
        if layers is not None:
            q = _project(part, cams, sh_degree, be, 1.0)
            out = be.composite_with_layer(q["means2d"], q["conics"], q["colors"], q["opacities"], q["depths"],
                                           q["radii"], layers, bg, TILE)
    elif rest_cache is not None and be.composite is not None:
        out, q = _over_rest_views(rest, part, cams, sh_degree, rest_cache, be, bg)
    if out is None:
        return _whole(rest, part, cams, sh_degree, be, bg)
    meta = {"means2d": q["means2d"], "radii": q["radii"], "width": cams.width, "height": cams.height,
            "n_cameras": len(cams)}
    return out[..., :3], out[..., 3], meta


def _whole(rest: dict[str, Tensor], part: dict[str, Tensor], cams: Cameras, sh_degree: int, backend: RenderBackend,
           bg: Tensor) -> tuple[Tensor, Tensor, dict]:
    """`render_part` by one `rasterize` of the rest and the part concatenated."""
    cat = {k: torch.cat([rest[k], part[k]]) for k in ("means", "quats", "scales", "opacities", "sh")}
    rgb = backend.colorize(sh_degree, cat["sh"], cat["means"], cams.viewmats)
    flag = torch.cat([rest["means"].new_zeros(len(rest["means"])), part["means"].new_ones(len(part["means"]))])
    feats = torch.cat([rgb, flag[None, :, None].expand(len(cams), -1, 1)], dim=-1)
    out, _, meta = backend.rasterize(cat["means"], cat["quats"], cat["scales"], cat["opacities"], feats,
                                     cams.viewmats, cams.Ks, cams.width, cams.height, backgrounds=bg)
    return out[..., :3], out[..., 3], meta


def _over_rest_views(rest: dict[str, Tensor], part: dict[str, Tensor], cams: Cameras, sh_degree: int,
                     cache: RestCache, backend: RenderBackend, bg: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """`render_part`'s [C,H,W,4] render with the backend's compositor over the rest's cached views
    (the "torch" backend), and the composited 2D Gaussians (means2d, radii; the part last)."""
    r, cached = _rest_views(rest, cams, sh_degree, cache, backend, bg[0])
    q = _project(part, cams, sh_degree, backend, 1.0)
    hot = touched_tiles(pixel_boxes(q["means2d"], q["radii"], cams.width, cams.height), cams.width, cams.height)
    hot |= ~cached.to(hot.device)[:, None, None]  # no render of the rest alone: composite everything
    near = boxes_touch(r["boxes"], hot)  # [C, n_rest]: rest Gaussians that can reach a composited pixel
    keep = near.any(0).nonzero()[:, 0]
    g = {k: torch.cat([r[k][:, keep], q[k]], dim=1) for k in q}
    g["radii"] = g["radii"] * torch.cat([near[:, keep], near.new_ones(len(cams), len(part["means"]))], 1)[..., None]
    out, _ = backend.composite(g["means2d"], g["conics"], g["colors"], g["opacities"], g["depths"], g["radii"],
                               cams.width, cams.height, bg, TILE, pixel_mask=hot)
    if "image" in r:
        out = torch.where(hot[..., None], out, r["image"].to(out))
    return out, g
