"""The Gaussians a click (or a box) selects: those carrying the compositing weight at the picked
pixels, grown to the part they belong to. The viewer's click handler calls `pick` and `grow`; tests
call them directly.

    weights = pixel_weights(scene, camera, [(120, 80)])          # [N] compositing weight at the click
    seed = weights >= 0.5 * weights.max()                         # the Gaussians that make that pixel
    part = grow(scene, seed, labels=None)                         # the part it belongs to
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from gendistill.core.cameras import Cameras
from gendistill.core.render import rasterize
from gendistill.core.scene import GaussianScene

__all__ = ["pixel_weights", "pick", "grow"]


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

    With `labels` [N] (a label field's argmax, or integer part ids): every Gaussian sharing the
    seed's majority label. Without: region growing over the k-nearest-neighbour graph of the centres,
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
        return labels == torch.mode(labels[seed]).values
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
