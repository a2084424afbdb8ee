"""The Gaussians a click (or a box) selects: those carrying the compositing weight at the picked
pixels, grown to the part they belong to. The viewer's click and box handlers call `client_camera`,
`pick` / `pick_box`, `grow` and `combine`; tests call them directly.

    weights = pixel_weights(scene, camera, [(120, 80)])          # [N] compositing weight at the click
    seed = weights >= 0.5 * weights.max()                         # the Gaussians that make that pixel
    part = grow(scene, seed, labels=None)                         # the part it belongs to
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from gendistill.core.cameras import Cameras
from gendistill.core.render import rasterize
from gendistill.core.scene import GaussianScene

__all__ = ["pixel_weights", "pick", "grow", "pick_box", "combine", "client_camera", "SELECT_MODES"]

SELECT_MODES = ("replace", "add", "subtract")


def pixel_weights(scene: GaussianScene, camera: Cameras, pixels: Sequence[tuple[int, int]] | Tensor, *,
                  backend: str = "auto") -> Tensor:
    """[N] compositing weight (alpha x transmittance) of each Gaussian, summed over `pixels` ((x, y)
    of the first camera of `camera`). Read from our own compositor as the gradient of the rendered
    pixels with respect to a per-Gaussian feature, so occlusion is exactly the renderer's."""
    cam = camera[0:1].to(scene.device, scene.means.dtype)
    feature = torch.zeros(len(scene), 1, dtype=scene.means.dtype, device=scene.device, requires_grad=True)
    args = dict(scene.detach().render_args(), colors=feature, sh_degree=None)
    img, _, _ = rasterize(**args, viewmats=cam.viewmats, Ks=cam.Ks, width=cam.width, height=cam.height,
                          backend=backend)
    xy = torch.as_tensor(pixels, dtype=torch.long).reshape(-1, 2)
    if ((xy < 0) | (xy >= torch.tensor([cam.width, cam.height]))).any():
        raise ValueError(f"pixels {xy.tolist()} are outside the {cam.width}x{cam.height} view")
    img[0, xy[:, 1].to(img.device), xy[:, 0].to(img.device), 0].sum().backward()
    return feature.grad[:, 0].detach()


def pick(scene: GaussianScene, camera: Cameras, pixels, *, share: float = 0.5, backend: str = "auto") -> Tensor:
    """[N] bool: the Gaussians whose weight at `pixels` is at least `share` of the largest one's."""
    w = pixel_weights(scene, camera, pixels, backend=backend)
    if float(w.max()) <= 0:
        return torch.zeros(len(scene), dtype=torch.bool, device=w.device)
    return w >= share * w.max()


def grow(scene: GaussianScene, seed: Tensor, *, labels: Tensor | None = None, k: int = 8,
         color_tolerance: float = 0.2, max_rounds: int = 200) -> Tensor:
    """[N] bool: `seed` [N] bool grown to its part.

    With `labels` [N] (integer part ids, -1 for none): every Gaussian sharing the seed's majority
    label, when that is a part. Without: region growing over the k-nearest-neighbour graph of the centres,
    across an edge only where the two colours (SH DC as RGB) differ by at most `color_tolerance`: a
    surface of one colour is taken whole, and the growth stops where the colour changes (a black hat
    on a white head).
    """
    from scipy.spatial import cKDTree

    seed = seed.detach().cpu().bool()
    if not seed.any():
        return seed
    if labels is not None:
        labels = labels.detach().cpu()
        label = torch.mode(labels[seed]).values
        if label >= 0:  # negative: no part there; grow by colour instead
            return labels == label
    pts = scene.means.detach().cpu().double().numpy()
    rgb = scene.colors_rgb().detach().cpu()
    _, nbr = cKDTree(pts).query(pts, k=min(k + 1, len(pts)))
    nbr = torch.from_numpy(nbr[:, 1:]).long()  # [N, k], self excluded
    selected, frontier = seed.clone(), seed.nonzero()[:, 0]
    for _ in range(max_rounds):
        cand = nbr[frontier]  # [F, k]
        ok = (rgb[cand] - rgb[frontier][:, None]).norm(dim=-1) <= color_tolerance
        new = cand[ok & ~selected[cand]].unique()
        if len(new) == 0:
            break
        selected[new] = True
        frontier = new
    return selected


def pick_box(scene: GaussianScene, camera: Cameras, box: tuple[int, int, int, int], *, min_weight: float = 0.02,
             backend: str = "auto") -> Tensor:
    """[N] bool: the visible Gaussians whose centre projects into `box` (x0, y0, x1, y1 pixels, ends
    included) of the first camera: a compositing weight of at least `min_weight` at some pixel of the
    box (so what is hidden behind the front surface is not taken)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    cam = camera[0:1]
    x0, x1 = sorted((max(0, min(x0, cam.width - 1)), max(0, min(x1, cam.width - 1))))
    y0, y1 = sorted((max(0, min(y0, cam.height - 1)), max(0, min(y1, cam.height - 1))))
    step = max(1, (max(x1 - x0, y1 - y0) + 1) // 64)  # at most ~64 x 64 pixels, one backward pass
    ys, xs = torch.meshgrid(torch.arange(y0, y1 + 1, step), torch.arange(x0, x1 + 1, step), indexing="ij")
    visible = pixel_weights(scene, cam, torch.stack([xs.flatten(), ys.flatten()], -1), backend=backend).cpu()
    uv, depth = cam.to("cpu", torch.float32).project(scene.means.detach().cpu().float())
    u, v = uv[0].unbind(-1)
    inside = (u >= x0) & (u < x1 + 1) & (v >= y0) & (v < y1 + 1) & (depth[0] > 0)
    return inside & (visible >= min_weight * step * step)


def combine(current: Tensor, new: Tensor, mode: str) -> Tensor:
    """The selection after a click or box in `mode`: "replace", "add" (union) or "subtract"."""
    if mode == "replace":
        return new.clone()
    if mode == "add":
        return current | new
    if mode == "subtract":
        return current & ~new
    raise ValueError(f"selection mode must be one of {SELECT_MODES}, got {mode!r}")


def client_camera(position, wxyz, fov: float, width: int, height: int) -> Cameras:
    """One pinhole camera from a viewer client's: `position` [3] and rotation `wxyz` [4] (camera to
    world, OpenCV axes: +z forward, +y down, as viser reports them), vertical field of view `fov` in
    radians, image size in pixels."""
    w, x, y, z = (float(v) for v in wxyz)
    rot = torch.tensor([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]], dtype=torch.float64)
    c2w = torch.eye(4, dtype=torch.float64)
    c2w[:3, :3], c2w[:3, 3] = rot, torch.as_tensor(position, dtype=torch.float64)
    f = 0.5 * height / math.tan(0.5 * float(fov))
    K = torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]], dtype=torch.float64)
    return Cameras(torch.linalg.inv(c2w)[None].float(), K[None].float(), int(width), int(height))
