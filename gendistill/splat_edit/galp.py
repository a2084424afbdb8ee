"""3D-GALP (RoMaP, arXiv 2507.11061): a per-Gaussian part-label field stored as spherical harmonics.

Every Gaussian carries label SH coefficients `label_sh` [N, K, 3] (degree 0..3, default 3) over the
three channels of a colour code: each part is a colour (red, green, blue, yellow, cyan, magenta,
then seeded random ones) and "no part" is black. The field is rendered with `rasterize` like RGB
(clamp_min(SH + 0.5, 0)), the geometry detached so that only the labels learn, and fitted to the
colour-coded multi-view part masks with

    loss = L1(render, mask colours) + neighbor_weight * neighbour loss on anchors.

Softness of Gaussian i: S_i = H_i * v_i, with H_i the entropy of the softmax over parts of the
cosine between its view-averaged label and each part code, v_i the variance of its label across
the training views (summed over channels). It is recomputed every `softness_every` steps; the
anchors are the K/2 softest and K/2 least soft Gaussians, and each anchor's label (its DC colour)
is pulled by L1 towards the mean label of its k nearest Gaussians (the mean held fixed).

Outputs: a boolean 3D mask per part (view-averaged label within `threshold`, summed absolute
difference, of the part code) and 2D masks per view (rendered label within `threshold`).

Two variants (`GALPConfig.variant`):

* "ours" (the default): the above. Labels start at DC 0 (grey 0.5); the neighbour target is the
  detached mean of the k nearest other Gaussians, L1 averaged over channels in colour space, from
  step 0; H from the visibility-weighted mean colour against the part codes; v visibility-weighted.
* "romap": as RoMaP's released code (janeyeon/RoMaP-code). Labels start at raw DC 0.5 (colour
  0.5 * C0 + 0.5, `load_ply` / `load_recon_ply` in gaussian_model.py); the neighbour loss is L1 on
  the raw DC coefficients, summed over channels and averaged over every (anchor, neighbour) pair of
  the k nearest Gaussians *including the anchor itself*, anchors and neighbours both receiving
  gradients, from step 51 on (`global_step > 50`); when there are more than `knn_max_points`
  Gaussians, anchors and neighbours come from a random subset of that size re-drawn each step
  (`loss_3d_certainty`, loss_utils.py:429-546). H is the entropy of the softmax of cos(raw DC,
  code) over the part codes plus black, clamped above at its 10th percentile; v the unweighted
  variance over views of the raw SH value, averaged over channels; S is min-max normalised
  (`find_uncertainty`, romap.py:699-786). The L1 of a step is summed over its views (romap.py:868).

Either variant may draw fresh targets every step from a mask provider (`recompute_targets`, as the
official code recomputes its attention masks each step) and supervise only labelled pixels
(`foreground_only`, the official code for generated scenes, romap.py:857-865).

The baseline `vote_masks` is GaussianEditor-style voting: each Gaussian's mask value averaged over
the pixels it composites into (each pixel once, as GaussianEditor's kernel counts), thresholded.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from gendistill.core.cameras import Cameras
from gendistill.core.render import rasterize
from gendistill.core.render.sh import SH_C0, eval_sh, num_sh_bases, sh_basis, sh_degree_from_bases
from gendistill.core.runtime import adam
from gendistill.core.scene import GaussianScene

__all__ = [
    "GALPConfig", "VARIANTS", "LabelField", "part_colors", "mask_colors", "soft_mask_colors", "init_label_sh", "render_labels",
    "view_labels", "weighted_view_mean", "codes_within", "view_contributions", "label_softness", "romap_softness",
    "select_anchors", "knn_indices", "knn_query", "neighbor_loss", "romap_neighbor_loss", "masks_3d", "masks_2d",
    "contribution_weights", "vote_masks", "mask_iou",
    "train_label_field", "labelled_scene", "labelled_from_masks", "masks_from_scene",
]

# RoMaP's first colour codes; later parts get seeded random colours
_BASE_COLORS = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 0.0), (0.0, 1.0, 1.0), (1.0, 0.0, 1.0)]
LABEL_PARTS_KEY = "label_parts"  # PLY comment key: JSON list of the part names, in code order
VARIANTS = ("ours", "romap")
ROMAP_INIT_DC = 0.5  # raw label DC of every Gaussian at the start (gaussian_model.py:671, :802)
ROMAP_NEIGHBOR_START = 51  # first step with the neighbour loss: `global_step > 50` (romap.py:878)
ROMAP_H_QUANTILE = 0.1  # H clamped above at this quantile (romap.py:776-777)


@dataclass
class GALPConfig:
    """3D-GALP training settings; defaults are the paper's.

    sh_degree: label SH degree 0..3. steps: optimisation steps. lr: Adam lr of the DC label
    coefficients; higher orders get lr * rest_lr_factor. n_anchors: K (K/2 softest + K/2 least
    soft). knn: neighbours per anchor (romap: the anchor itself included). neighbor_weight: weight
    of the neighbour loss relative to the L1. softness_every: steps between softness / anchor
    updates. threshold: summed absolute difference to a part code below which a label counts as
    that part (3D and 2D masks).
    views_per_step: views rendered per step. softmax_temperature: of the cosine softmax in H_i.
    min_view_weight: a Gaussian whose compositing weight (alpha * T summed over a view's pixels)
    stays below this in every training view is unseen: the masks say nothing about it (inside an
    occluder, L1 gradients of ~1e-4 still steer its label through Adam), so after fitting its label
    is reset to black (no part). Editing it could not change any training view anyway.

    variant: "ours" (default) or "romap" (RoMaP's released code: init, softness, neighbour loss, soft
    targets; see the module docstring). tools/bench_segment.py (snowman, 20k Gaussians, 3D mIoU,
    ours / romap / voting): clean masks 0.979 / 0.952 / 0.980, noisy 0.963 / 0.897 / 0.975, the
    demo model's attention masks for the hat 0.844 / 0.884 / 0.856 (second seed 0.867 / 0.901 /
    0.885). "romap" is better on attention masks, which miss the same fifth of the hat in every view
    and which its stronger neighbour loss fills in; "ours" is better on mask files. So "ours" stays
    the default for masks users bring, and the paper config (romap_sd3.yaml) uses "romap".
    neighbor_start: first step (0-based) with the neighbour loss; None: the variant's (ours 0,
    romap 51). knn_max_points (romap): above this many Gaussians, anchors and neighbours are drawn
    from a random subset of this size each step. recompute_targets: draw the targets of every
    step's views from the `mask_fn` given to `LabelField` instead of the fixed masks.
    foreground_only: the L1 covers only pixels some part claims (mask > 0.5).
    """

    sh_degree: int = 3
    steps: int = 600
    lr: float = 0.0125
    rest_lr_factor: float = 1.0 / 20.0
    n_anchors: int = 1000
    knn: int = 50
    neighbor_weight: float = 2.0
    softness_every: int = 50
    threshold: float = 1.0
    views_per_step: int = 1
    softmax_temperature: float = 1.0
    min_view_weight: float = 1e-3
    seed: int = 0
    backend: str = "auto"
    variant: str = "ours"
    neighbor_start: int | None = None
    knn_max_points: int = 300_000
    recompute_targets: bool = False
    foreground_only: bool = False

    def __post_init__(self):
        num_sh_bases(self.sh_degree)  # raises for a bad degree
        if self.variant not in VARIANTS:
            raise ValueError(f"GALPConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.neighbor_start is not None and self.neighbor_start < 0:
            raise ValueError(f"GALPConfig.neighbor_start must be >= 0 or None, got {self.neighbor_start}")
        if self.knn_max_points < 1:
            raise ValueError(f"GALPConfig.knn_max_points must be >= 1, got {self.knn_max_points}")
        for name in ("recompute_targets", "foreground_only"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GALPConfig.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("steps", "softness_every", "views_per_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"GALPConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_anchors < 0 or self.knn < 1:
            raise ValueError(f"GALPConfig: n_anchors must be >= 0 and knn >= 1, got {self.n_anchors}, {self.knn}")
        if self.lr <= 0 or self.threshold <= 0 or self.softmax_temperature <= 0:
            raise ValueError("GALPConfig: lr, threshold and softmax_temperature must be positive")
        if self.min_view_weight < 0:
            raise ValueError(f"GALPConfig.min_view_weight must be >= 0, got {self.min_view_weight}")

    @property
    def first_neighbor_step(self) -> int:
        """The first step (0-based) with the neighbour loss: `neighbor_start`, else the variant's."""
        if self.neighbor_start is not None:
            return self.neighbor_start
        return ROMAP_NEIGHBOR_START if self.variant == "romap" else 0


# ---------------------------------------------------------------------- colour codes
def part_colors(n: int, seed: int = 0) -> Tensor:
    """[n, 3] colour codes: red, green, blue, yellow, cyan, magenta, then seeded random colours
    (kept at least 0.3 in summed absolute difference away from black and from earlier codes)."""
    cols = [torch.tensor(c) for c in _BASE_COLORS[:n]]
    g = torch.Generator().manual_seed(seed)
    while len(cols) < n:
        c = torch.rand(3, generator=g)
        if c.sum() > 0.3 and all((c - o).abs().sum() > 0.3 for o in cols):
            cols.append(c)
    return torch.stack(cols) if cols else torch.zeros(0, 3)


def mask_colors(masks: Tensor, colors: Tensor, threshold: float = 0.5) -> Tensor:
    """Colour-code part masks: masks [C, P, H, W] (values in [0, 1]), colors [P, 3] -> [C, H, W, 3].

    A pixel takes the code of the first listed part whose mask exceeds `threshold` (earlier parts
    claim pixels first); pixels of no part are black.
    """
    if masks.dim() != 4 or colors.shape != (masks.shape[1], 3):
        raise ValueError(f"mask_colors: masks must be [C, P, H, W] and colors [P, 3], got "
                         f"{list(masks.shape)} and {list(colors.shape)}")
    c, p, h, w = masks.shape
    out = masks.new_zeros(c, h, w, 3)
    free = torch.ones(c, h, w, dtype=torch.bool, device=masks.device)
    for i in range(p):
        take = (masks[:, i] > threshold) & free
        out[take] = colors[i].to(out)
        free &= ~take
    return out


def soft_mask_colors(masks: Tensor, colors: Tensor) -> Tensor:
    """RoMaP's soft colour targets [C, H, W, 3] from soft masks [C, P, H, W] (attention output "soft") and
    part codes colors [P, 3]: sum_p mask_p code_p, min-max normalised per view over its pixels and
    channels (romap.py :1134-1138)."""
    if masks.dim() != 4 or colors.shape != (masks.shape[1], 3):
        raise ValueError(f"soft_mask_colors: masks must be [C, P, H, W] and colors [P, 3], got "
                         f"{list(masks.shape)} and {list(colors.shape)}")
    t = torch.einsum("cphw,pk->chwk", masks.float(), colors.to(masks.device).float())
    flat = t.flatten(1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(t)


# ---------------------------------------------------------------------- rendering and per-view labels
def init_label_sh(n: int, sh_degree: int = 3, *, dc: float = 0.0, device=None, dtype=torch.float32) -> Tensor:
    """[N, K, 3] initial labels: raw DC `dc` in every channel, higher orders 0.

    dc 0 (ours): mid grey (0.5), equally far from every code; RoMaP's released code uses 0.5
    (colour 0.5 * C0 + 0.5 ~ 0.64).
    """
    out = torch.zeros(n, num_sh_bases(sh_degree), 3, device=device, dtype=dtype)
    out[:, 0] = dc
    return out


def _geometry(scene: GaussianScene) -> dict[str, Tensor]:
    a = scene.render_args()
    return {k: a[k].detach() for k in ("means", "quats", "scales", "opacities")}


def render_labels(scene: GaussianScene, label_sh: Tensor, cameras: Cameras, *, backend: str = "auto",
                  geometry: dict[str, Tensor] | None = None) -> Tensor:
    """Render the label field: label_sh [N, K, 3] -> [C, H, W, 3], black background.

    The geometry is detached: gradients reach `label_sh` only.
    """
    geo = geometry if geometry is not None else _geometry(scene)
    cams = cameras.to(geo["means"].device, geo["means"].dtype)
    render, _, _ = rasterize(geo["means"], geo["quats"], geo["scales"], geo["opacities"], label_sh,
                             cams.viewmats, cams.Ks, cams.width, cams.height,
                             sh_degree=sh_degree_from_bases(label_sh.shape[1]),
                             backgrounds=label_sh.new_zeros(len(cams), 3), backend=backend)
    return render


def view_labels(means: Tensor, label_sh: Tensor, cameras: Cameras | None) -> Tensor:
    """Label colour of every Gaussian seen from every camera: [C, N, 3], clamp_min(SH + 0.5, 0).

    Without cameras, the average over all directions: the DC colour, [1, N, 3].
    """
    if cameras is None:
        return torch.clamp_min(label_sh[None, :, 0] * SH_C0 + 0.5, 0.0)
    centres = cameras.to(means.device, means.dtype).centers()  # [C, 3]
    dirs = means[None] - centres[:, None]  # [C, N, 3]
    deg = sh_degree_from_bases(label_sh.shape[1])
    return torch.clamp_min(eval_sh(deg, label_sh[None].expand(len(centres), -1, -1, -1), dirs) + 0.5, 0.0)


def weighted_view_mean(labels: Tensor, weights: Tensor | None, fallback: Tensor | None = None) -> Tensor:
    """[N, 3] mean of per-view labels [C, N, 3] with per-view weights [C, N] (plain mean if None);
    Gaussians of zero total weight get `fallback` [N, 3] (or the plain mean)."""
    if weights is None:
        return labels.mean(dim=0)
    total = weights.sum(dim=0)  # [N]
    mean = (weights[..., None] * labels).sum(dim=0) / total.clamp_min(1e-12)[:, None]
    other = labels.mean(dim=0) if fallback is None else fallback
    return torch.where(total[:, None] > 0, mean, other)


def codes_within(labels: Tensor, colors: Tensor, threshold: float = 1.0) -> Tensor:
    """[P, N] bool: labels [..., N, 3] within `threshold` (summed |difference|) of a part code
    [P, 3] and nearer to it than to any other code and to black (no part).

    Nearest-code assignment keeps the masks disjoint and keeps near-black labels out: red and
    black are only 1.0 apart, as are red and yellow, so a plain threshold would put a dim red
    (0.1, 0, 0) or a half-way (1, 0.5, 0) label in a part, or in two.
    """
    codes = torch.cat([colors.to(labels), labels.new_zeros(1, 3)])  # black last
    d = (labels[..., None, :] - codes).abs().sum(dim=-1)  # [..., N, P + 1]
    nearest = torch.nn.functional.one_hot(d.argmin(dim=-1), codes.shape[0]).bool()
    out = (d < threshold) & nearest
    return out[..., :-1].movedim(-1, -2 if labels.dim() == 2 else 1)


def label_softness(labels: Tensor, colors: Tensor, temperature: float = 1.0,
                   weights: Tensor | None = None) -> Tensor:
    """S_i = H_i * v_i from per-view labels [C, N, 3] and part codes [P, 3] -> [N].

    H_i: entropy of softmax_p(cos(mean label, code_p) / temperature); v_i: variance of the label
    across the views, summed over channels. With `weights` [C, N] (how much each view sees each
    Gaussian) mean and variance are weighted, so that views where a Gaussian is hidden do not count.
    """
    mean = weighted_view_mean(labels, weights)  # [N, 3]
    unit = torch.nn.functional.normalize
    cos = unit(mean, dim=-1, eps=1e-8) @ unit(colors.to(mean), dim=-1).T  # [N, P]
    logp = torch.log_softmax(cos / temperature, dim=-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    if weights is None:
        var = labels.var(dim=0, unbiased=False).sum(dim=-1)
    else:
        var = weighted_view_mean(((labels - mean) ** 2).sum(dim=-1, keepdim=True), weights)[:, 0]
    return entropy * var


def _quantile(x: Tensor, q: float) -> Tensor:
    """torch.quantile (linear interpolation) of a 1-D tensor, without its 16M-element limit."""
    v = x.sort().values
    pos = q * (v.numel() - 1)
    lo, hi = int(pos), min(int(pos) + 1, v.numel() - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def romap_softness(raw_labels: Tensor, label_dc: Tensor, colors: Tensor, quantile: float = ROMAP_H_QUANTILE) -> Tensor:
    """S = H * v as RoMaP's released `find_uncertainty` -> [N] in [0, 1] (min-max normalised).

    raw_labels: [C, N, 3] label SH evaluated from each view (no + 0.5, no clamp); label_dc: [N, 3]
    raw DC coefficients; colors: [P, 3] part codes. H: entropy of softmax(cos(raw DC, code)) over
    the P codes plus black (whose cosine is 0), clamped above at its `quantile` quantile; v:
    variance over the views (unweighted), averaged over channels.
    """
    unit = torch.nn.functional.normalize
    codes = torch.cat([colors.to(label_dc), label_dc.new_zeros(1, 3)])  # [P + 1, 3], black last
    cos = unit(label_dc, dim=-1, eps=1e-8) @ unit(codes, dim=-1, eps=1e-8).T  # [N, P + 1]
    p = torch.softmax(cos, dim=-1)
    entropy = -(p * torch.log(p + 1e-8)).sum(dim=-1)
    entropy = entropy.clamp(0.0, float(_quantile(entropy, quantile)))
    s = entropy * raw_labels.var(dim=0, unbiased=False).mean(dim=-1)
    return (s - s.min()) / (s.max() - s.min() + 1e-6)


def select_anchors(softness: Tensor, k: int) -> Tensor:
    """Indices [<= k] of the k/2 softest and k/2 least soft Gaussians (no index twice)."""
    n = softness.shape[0]
    if k >= n:
        return torch.arange(n, device=softness.device)
    order = torch.argsort(softness, descending=True)
    half = k // 2
    return torch.cat([order[:half], order[n - (k - half):]])


def knn_indices(means: Tensor, k: int) -> Tensor:
    """[N, k'] indices of the k' = min(k, N - 1) nearest other Gaussians of each Gaussian (a KD-tree)."""
    from scipy.spatial import cKDTree

    pts = means.detach().double().cpu().numpy()
    k = min(k, len(pts) - 1)
    if k < 1:
        return torch.zeros(len(pts), 0, dtype=torch.long, device=means.device)
    _, idx = cKDTree(pts).query(pts, k=k + 1)
    return torch.from_numpy(np.asarray(idx)[:, 1:]).long().to(means.device)


def knn_query(points: Tensor, queries: Tensor, k: int) -> Tensor:
    """[A, k'] indices into points [M, 3] of the k' = min(k, M) nearest points of each query [A, 3]
    (a query that is one of the points finds itself first)."""
    from scipy.spatial import cKDTree

    k = min(k, points.shape[0])
    if k < 1 or queries.shape[0] == 0:
        return torch.zeros(queries.shape[0], 0, dtype=torch.long, device=points.device)
    _, idx = cKDTree(points.detach().double().cpu().numpy()).query(queries.detach().double().cpu().numpy(), k=k)
    return torch.from_numpy(np.asarray(idx).reshape(queries.shape[0], k)).long().to(points.device)


def romap_neighbor_loss(label_dc: Tensor, anchors: Tensor, neighbors: Tensor) -> Tensor:
    """RoMaP's released neighbour loss (unweighted): L1 between raw DC coefficients, summed over
    channels, averaged over every (anchor, neighbour) pair; anchors and neighbours both get gradients.

    label_dc: [N, 3] raw DC; anchors: [A]; neighbors: [A, k] each anchor's k nearest (itself included).
    """
    if anchors.numel() == 0 or neighbors.shape[1] == 0:
        return label_dc.sum() * 0.0
    return (label_dc[anchors][:, None] - label_dc[neighbors]).abs().sum(dim=-1).mean()


def neighbor_loss(label_dc: Tensor, anchors: Tensor, neighbors: Tensor) -> Tensor:
    """Mean L1 between each anchor's DC label colour and the (fixed) mean of its neighbours' ones.

    label_dc: [N, 3] DC coefficients; anchors: [A]; neighbors: [N, k].
    """
    if anchors.numel() == 0 or neighbors.shape[1] == 0:
        return label_dc.sum() * 0.0
    col = label_dc * SH_C0 + 0.5
    target = col.detach()[neighbors[anchors]].mean(dim=1)  # [A, 3]
    return (col[anchors] - target).abs().mean()


# ---------------------------------------------------------------------- masks out
def masks_3d(label_sh: Tensor, means: Tensor, colors: Tensor, cameras: Cameras | None = None,
             threshold: float = 1.0) -> Tensor:
    """[P, N] bool: the view-averaged label within `threshold` (summed |difference|) of each part code.

    The average is over `cameras` (the training views) or, without them, over all directions.
    """
    with torch.no_grad():
        return codes_within(view_labels(means, label_sh, cameras).mean(dim=0), colors, threshold)


def masks_2d(label_images: Tensor, colors: Tensor, threshold: float = 1.0) -> Tensor:
    """[C, P, H, W] bool from rendered labels [C, H, W, 3]: pixels within `threshold` of a part code
    and nearest to it (black, no part, included), as `codes_within`."""
    c, h, w, _ = label_images.shape
    return codes_within(label_images.reshape(c, h * w, 3), colors, threshold).reshape(c, -1, h, w)


# ---------------------------------------------------------------------- voting baseline
def view_contributions(scene: GaussianScene, cameras: Cameras, *, backend: str = "auto",
                       geometry: dict[str, Tensor] | None = None, chunk: int = 8) -> Tensor:
    """[C, N] compositing weight (sum of alpha * T over the view's pixels) of each Gaussian in each view."""
    geo = geometry if geometry is not None else _geometry(scene)
    out = []
    for s in range(0, len(cameras), chunk):
        cams = cameras[list(range(s, min(s + chunk, len(cameras))))].to(geo["means"].device, geo["means"].dtype)
        feats = geo["means"].new_zeros(len(cams), geo["means"].shape[0], 1, requires_grad=True)
        render, _, _ = rasterize(geo["means"], geo["quats"], geo["scales"], geo["opacities"], feats,
                                 cams.viewmats, cams.Ks, cams.width, cams.height, backend=backend)
        (grad,) = torch.autograd.grad(render.sum(), feats)
        out.append(grad[..., 0])
    return torch.cat(out)


def contribution_weights(scene: GaussianScene, cameras: Cameras, *, backend: str = "auto") -> Tensor:
    """[N] total compositing weight (sum of alpha * T over every pixel of every view) per Gaussian;
    0 for Gaussians no view sees."""
    return view_contributions(scene, cameras, backend=backend).sum(dim=0)


def vote_masks(scene: GaussianScene, cameras: Cameras, masks: Tensor, *, threshold: float = 0.5,
               return_scores: bool = False, chunk: int = 8):
    """GaussianEditor-style voting: [P, N] bool, a Gaussian's mask value averaged over the pixels it
    composites into in all views (each pixel counts once, whatever its alpha * T, as GaussianEditor's
    `apply_weights` kernel), above `threshold`. masks: [C, P, H, W] in [0, 1].

    With `return_scores`, also the [P, N] averages (0 for Gaussians no view sees).
    """
    from gendistill.core.render.projection import project_gaussians
    from gendistill.core.render.torch_backend import pixel_votes

    _check_mask_shape(masks, cameras)
    geo = _geometry(scene)
    n, p = geo["means"].shape[0], masks.shape[1]
    counts, sums = geo["means"].new_zeros(n), geo["means"].new_zeros(n, p)
    for s in range(0, len(cameras), chunk):
        cams = cameras[list(range(s, min(s + chunk, len(cameras))))].to(geo["means"].device, geo["means"].dtype)
        with torch.no_grad():
            radii, means2d, depths, conics = project_gaussians(geo["means"], geo["quats"], geo["scales"],
                                                               geo["opacities"], cams.viewmats, cams.Ks,
                                                               cams.width, cams.height)
            opac = geo["opacities"][None].expand(len(cams), -1)
            values = masks[s : s + len(cams)].to(means2d).permute(0, 2, 3, 1)
            c, _, v = pixel_votes(means2d, conics, opac, depths, radii, cams.width, cams.height, values)
        counts += c.sum(0)
        sums += v.sum(0)
    scores = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], torch.zeros_like(sums)).T
    out = scores > threshold
    return (out, scores) if return_scores else out


def mask_iou(pred: Tensor, truth: Tensor, valid: Tensor | None = None) -> Tensor:
    """[P] IoU of boolean masks pred, truth [P, N] over the Gaussians in `valid` [N] (all if None);
    1.0 where a part is empty in both."""
    if valid is not None:
        pred, truth = pred[:, valid], truth[:, valid]
    inter = (pred & truth).sum(dim=1).float()
    union = (pred | truth).sum(dim=1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def _check_mask_shape(masks: Tensor, cameras: Cameras) -> None:
    if masks.dim() != 4 or masks.shape[0] != len(cameras) or tuple(masks.shape[2:]) != (cameras.height, cameras.width):
        raise ValueError(f"masks must be [C={len(cameras)}, P, H={cameras.height}, W={cameras.width}] to match "
                         f"the cameras, got {list(masks.shape)}")


# ---------------------------------------------------------------------- training
class LabelField:
    """A 3D-GALP label field being fitted to multi-view part masks (state: labels, optimizer, anchors).

    Args:
        scene: the Gaussians (geometry is read, never changed).
        cameras: C training views. masks: [C, P, H, W] values in [0, 1], one channel per part.
        parts: P part names (the order of `masks`; earlier parts claim overlapping pixels).
        config: GALPConfig. colors: [P, 3] codes (default `part_colors(P)`).
        mask_fn: with `config.recompute_targets`, called every step with the step's view indices,
            returns their masks [V, P, H, W] (e.g. attention masks under fresh noise).
    """

    def __init__(self, scene: GaussianScene, cameras: Cameras, masks: Tensor, parts: Sequence[str],
                 config: GALPConfig | None = None, colors: Tensor | None = None,
                 mask_fn: Callable[[list[int]], Tensor] | None = None):
        self.config = cfg = config or GALPConfig()
        if cfg.recompute_targets and mask_fn is None:
            raise ValueError("GALPConfig.recompute_targets is set but LabelField got no mask_fn to recompute "
                             "the targets from")
        self.mask_fn = mask_fn
        self.parts = list(parts)
        if masks.dim() != 4 or masks.shape[1] != len(self.parts):
            raise ValueError(f"masks must be [C, P={len(self.parts)}, H, W] for parts {self.parts}, "
                             f"got {list(masks.shape)}")
        _check_mask_shape(masks, cameras)
        self.scene, self.cameras = scene, cameras
        self.geometry = _geometry(scene)
        dev, dt = self.geometry["means"].device, self.geometry["means"].dtype
        self.colors = (colors if colors is not None else part_colors(len(self.parts), cfg.seed)).to(dev, dt)
        self.colorize = soft_mask_colors if cfg.variant == "romap" else mask_colors  # RoMaP's targets are soft
        self.targets = self.colorize(masks.to(dev, dt), self.colors)  # [C, H, W, 3]
        self.foreground = (masks > 0.5).any(dim=1).to(dev)  # [C, H, W]: pixels some part claims
        self.romap = cfg.variant == "romap"
        init = init_label_sh(len(scene), cfg.sh_degree, dc=ROMAP_INIT_DC if self.romap else 0.0, device=dev, dtype=dt)
        self.dc = init[:, :1].clone().requires_grad_(True)
        self.rest = init[:, 1:].clone().requires_grad_(True)
        groups = [{"params": [self.dc], "lr": cfg.lr}]
        if self.rest.shape[1]:
            groups.append({"params": [self.rest], "lr": cfg.lr * cfg.rest_lr_factor})
        self.optimizer = adam(groups, eps=1e-15)
        # ours: the k nearest other Gaussians of every Gaussian, once; romap: the anchors' k nearest
        # (themselves included), found when the anchors change
        self.neighbors = None if self.romap else knn_indices(self.geometry["means"], cfg.knn)
        self.anchor_neighbors = torch.zeros(0, 0, dtype=torch.long, device=dev)
        # fixed geometry and views: the SH basis of every (view, Gaussian) and how much each view sees
        # each Gaussian are computed once
        dirs = self.geometry["means"][None] - cameras.to(dev, dt).centers()[:, None]  # [C, N, 3]
        self.basis = sh_basis(cfg.sh_degree, torch.nn.functional.normalize(dirs, dim=-1))  # [C, N, K]
        self.view_weights = view_contributions(scene, cameras, backend=cfg.backend, geometry=self.geometry)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.softness = torch.zeros(len(scene), device=dev, dtype=dt)
        self.anchors = torch.zeros(0, dtype=torch.long, device=dev)
        self.step_count = 0
        self._order: list[int] = []
        self.last_losses: dict[str, float] = {}

    @property
    def label_sh(self) -> Tensor:
        """[N, K, 3] current label coefficients (detached)."""
        return torch.cat([self.dc, self.rest], dim=1).detach()

    def _view_colors(self, label: Tensor, views: Sequence[int] | None = None) -> Tensor:
        """[V, N, 3] label colours clamp_min(SH + 0.5, 0) seen from the training views `views` (all)."""
        basis = self.basis if views is None else self.basis[views]
        return torch.clamp_min(torch.einsum("cnk,nkd->cnd", basis, label) + 0.5, 0.0)

    def mean_labels(self) -> Tensor:
        """[N, 3] each Gaussian's label averaged over the training views, weighted by how much each
        view sees it (its compositing weight); the DC colour for Gaussians no view sees."""
        with torch.no_grad():
            return weighted_view_mean(self._view_colors(self.label_sh), self.view_weights,
                                      view_labels(self.geometry["means"], self.label_sh, None)[0])

    def update_softness(self) -> None:
        """Recompute S = H * v over the training views and re-draw the anchors (and, for romap, their
        neighbours)."""
        cfg = self.config
        with torch.no_grad():
            if self.romap:
                raw = torch.einsum("cnk,nkd->cnd", self.basis, self.label_sh)  # [C, N, 3]
                self.softness = romap_softness(raw, self.dc[:, 0].detach(), self.colors)
            else:
                labels = self._view_colors(self.label_sh)
                self.softness = label_softness(labels, self.colors, cfg.softmax_temperature, self.view_weights)
        self.anchors = select_anchors(self.softness, cfg.n_anchors)
        if self.romap and len(self.scene) <= cfg.knn_max_points:
            means = self.geometry["means"]
            self.anchor_neighbors = knn_query(means, means[self.anchors], cfg.knn)

    def _romap_subset_anchors(self) -> tuple[Tensor, Tensor]:
        """Anchors [A] and their neighbours [A, k] drawn from a random subset of `knn_max_points`
        Gaussians (a fresh subset each call)."""
        cfg = self.config
        means = self.geometry["means"]
        subset = torch.randperm(len(self.scene), generator=self.generator)[: cfg.knn_max_points].to(means.device)
        anchors = subset[select_anchors(self.softness[subset], cfg.n_anchors)]
        return anchors, subset[knn_query(means[subset], means[anchors], cfg.knn)]

    def _neighbor_term(self) -> Tensor:
        """The unweighted neighbour loss of this step (0 before `first_neighbor_step`)."""
        dc = self.dc[:, 0]
        if self.step_count < self.config.first_neighbor_step:
            return dc.new_zeros(())
        if not self.romap:
            return neighbor_loss(dc, self.anchors, self.neighbors)
        if len(self.scene) > self.config.knn_max_points:
            return romap_neighbor_loss(dc, *self._romap_subset_anchors())
        return romap_neighbor_loss(dc, self.anchors, self.anchor_neighbors)

    def _step_targets(self, views: list[int]) -> tuple[Tensor, Tensor]:
        """Targets [V, H, W, 3] and foreground [V, H, W] of `views`: fixed, or from `mask_fn`."""
        if not self.config.recompute_targets:
            return self.targets[views], self.foreground[views]
        masks = self.mask_fn(views)
        want = (len(views), len(self.parts), self.cameras.height, self.cameras.width)
        if tuple(masks.shape) != want:
            raise ValueError(f"mask_fn must return masks [V, P, H, W] = {list(want)}, got {list(masks.shape)}")
        masks = masks.to(self.targets)
        return self.colorize(masks, self.colors), (masks > 0.5).any(dim=1)

    def _l1(self, render: Tensor, views: list[int]) -> Tensor:
        """L1 of renders [V, H, W, 3] against the targets: per view the mean over pixels and channels
        (foreground pixels only with `foreground_only`); the mean over views (romap: the sum)."""
        target, fg = self._step_targets(views)
        err = (render - target).abs()
        if self.config.foreground_only:
            per_view = (err * fg[..., None]).sum(dim=(1, 2, 3)) / (3 * fg.sum(dim=(1, 2))).clamp_min(1)
        else:
            per_view = err.mean(dim=(1, 2, 3))
        return per_view.sum() if self.romap else per_view.mean()

    def _next_views(self) -> list[int]:
        out = []
        while len(out) < self.config.views_per_step:
            if not self._order:
                self._order = torch.randperm(len(self.cameras), generator=self.generator).tolist()
            out.append(self._order.pop())
        return out

    def step(self) -> float:
        """One optimisation step on `views_per_step` views; returns the total loss."""
        cfg = self.config
        if self.step_count % cfg.softness_every == 0:
            self.update_softness()
        views = self._next_views()
        label = torch.cat([self.dc, self.rest], dim=1)
        colors = self._view_colors(label, views)  # [V, N, 3]: rasterize takes per-view features
        geo, cams = self.geometry, self.cameras[views].to(self.geometry["means"].device, label.dtype)
        render, _, _ = rasterize(geo["means"], geo["quats"], geo["scales"], geo["opacities"], colors, cams.viewmats,
                                 cams.Ks, cams.width, cams.height, backgrounds=label.new_zeros(len(views), 3),
                                 backend=cfg.backend)
        l1 = self._l1(render, views)
        nb = self._neighbor_term()
        loss = l1 + cfg.neighbor_weight * nb
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step_count += 1
        self.last_losses = {"l1": float(l1.detach()), "neighbor": float(nb.detach())}
        return float(loss.detach())

    def fit(self, steps: int | None = None, progress: bool = True) -> "LabelField":
        """Run `steps` (default config.steps) steps with a tqdm bar, then refresh the softness."""
        from tqdm.auto import tqdm

        bar = tqdm(range(steps if steps is not None else self.config.steps), desc="3D-GALP", disable=not progress,
                   leave=False)
        for _ in bar:
            self.step()
            if self.step_count % 10 == 0:
                bar.set_postfix(l1=f"{self.last_losses['l1']:.4f}", nb=f"{self.last_losses['neighbor']:.4f}")
        self.clear_unseen()
        self.update_softness()
        return self

    def unseen(self) -> Tensor:
        """[N] bool: Gaussians below `min_view_weight` in every training view."""
        return self.view_weights.amax(dim=0) < self.config.min_view_weight

    def clear_unseen(self) -> None:
        """Reset the labels of unseen Gaussians to black (no part): DC (0 - 0.5) / C0, no higher orders."""
        hidden = self.unseen()
        with torch.no_grad():
            self.dc[hidden] = -0.5 / SH_C0
            self.rest[hidden] = 0.0

    def masks_3d(self, threshold: float | None = None) -> Tensor:
        """[P, N] bool 3D part masks (view-averaged over the training views)."""
        return codes_within(self.mean_labels(), self.colors, self.config.threshold if threshold is None else threshold)

    def render(self, cameras: Cameras | None = None) -> Tensor:
        """[C, H, W, 3] rendered labels (training views by default)."""
        with torch.no_grad():
            return render_labels(self.scene, self.label_sh, cameras or self.cameras, backend=self.config.backend,
                                 geometry=self.geometry)

    def masks_2d(self, cameras: Cameras | None = None, threshold: float | None = None) -> Tensor:
        """[C, P, H, W] bool 2D part masks rendered from the label field."""
        return masks_2d(self.render(cameras), self.colors, self.config.threshold if threshold is None else threshold)

    def to_scene(self) -> GaussianScene:
        """A copy of the scene with `label_sh`, `certainty` (the softness) and the part names set."""
        return labelled_scene(self.scene, self.label_sh, self.softness, self.parts, self.colors)


def train_label_field(scene: GaussianScene, cameras: Cameras, masks: Tensor, parts: Sequence[str],
                      config: GALPConfig | None = None, *, progress: bool = True,
                      mask_fn: Callable[[list[int]], Tensor] | None = None) -> LabelField:
    """Fit a 3D-GALP label field to part masks [C, P, H, W]; returns the fitted `LabelField`
    (`mask_fn`: see `LabelField`).

    Warns, naming the part, when a part's 3D mask comes out empty.
    """
    field = LabelField(scene, cameras, masks, parts, config, mask_fn=mask_fn).fit(progress=progress)
    m = field.masks_3d()
    for i, name in enumerate(field.parts):
        if not bool(m[i].any()):
            warnings.warn(f"3D-GALP: the 3D mask of part {name!r} is empty (no Gaussian's label is within "
                          f"{field.config.threshold} of its code)", stacklevel=2)
    return field


# ---------------------------------------------------------------------- PLY round trip
def labelled_scene(scene: GaussianScene, label_sh: Tensor, certainty: Tensor | None, parts: Sequence[str],
                   colors: Tensor | None = None) -> GaussianScene:
    """A copy of `scene` with label_sh / certainty set and comments `label_parts: [...]` (JSON)
    and `label_colors: [[r, g, b], ...]` recording which code is which part."""
    out = scene.clone()
    out.label_sh = label_sh.detach().to(scene.means)
    out.certainty = None if certainty is None else certainty.detach().to(scene.means)
    cols = (colors if colors is not None else part_colors(len(parts))).detach().cpu()
    keep = [c for c in out.comments if not c.startswith((LABEL_PARTS_KEY + ":", "label_colors:"))]
    out.comments = keep + [f"{LABEL_PARTS_KEY}: {json.dumps(list(parts))}",
                           f"label_colors: {json.dumps([[round(float(v), 6) for v in c] for c in cols])}"]
    return out


def labelled_from_masks(scene: GaussianScene, masks: dict[str, Tensor | np.ndarray]) -> GaussianScene:
    """A copy of `scene` with a degree-0 label field holding hard 3D masks {part: [N] bool} (the
    first listed part wins an overlap): each part's Gaussians take its code, the rest black, so
    `masks_from_scene` gives the masks back. For parts picked by hand (`gendistill view`)."""
    codes = part_colors(len(masks))
    target = torch.zeros(len(scene), 3)
    free = torch.ones(len(scene), dtype=torch.bool)
    for code, (name, mask) in zip(codes, masks.items()):
        mask = torch.as_tensor(np.asarray(mask.cpu() if torch.is_tensor(mask) else mask, bool))
        if mask.shape != (len(scene),):
            raise ValueError(f"mask of part {name!r} has shape {list(mask.shape)}, the scene {len(scene)} Gaussians")
        target[mask & free], free = code, free & ~mask
    label_sh = ((target - 0.5) / SH_C0)[:, None, :]  # [N, 1, 3]: DC * SH_C0 + 0.5 = the code
    return labelled_scene(scene, label_sh, None, list(masks), codes)


def masks_from_scene(scene: GaussianScene, parts: Sequence[str] | None = None, *, cameras: Cameras | None = None,
                     threshold: float = 1.0) -> dict[str, Tensor]:
    """3D masks {part: [N] bool} of a labelled scene (as `labelled_scene` / `gendistill segment` write).

    `parts` defaults to all labelled parts; the label is averaged over `cameras` or, without them,
    over all directions (its DC colour).
    """
    if scene.label_sh is None:
        raise ValueError("this scene has no label field (obj_dc_* properties); run `gendistill segment` first")
    meta = scene.metadata()
    if LABEL_PARTS_KEY not in meta:
        raise ValueError(f"this scene's label field has no '{LABEL_PARTS_KEY}' comment naming its parts")
    known = json.loads(meta[LABEL_PARTS_KEY])
    colors = torch.tensor(json.loads(meta["label_colors"])) if "label_colors" in meta else part_colors(len(known))
    wanted = known if parts is None else list(parts)
    missing = [p for p in wanted if p not in known]
    if missing:
        raise ValueError(f"part(s) {missing} are not labelled in this scene (labelled: {known})")
    m = masks_3d(scene.label_sh, scene.means, colors, cameras, threshold)
    return {p: m[known.index(p)] for p in wanted}
