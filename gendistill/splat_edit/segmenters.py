"""Part masks from 2D segmenters: two `MASK_SOURCES` entries, "clipseg" (text) and "sam" (a 3D click).

Both render the scene at `cameras` (a `Cameras` batch or a camera file / folder `load_cameras`
reads; or take the given `images` [C, H, W, 3] in [0, 1]), run a transformers model loaded with
`from_pretrained(model)` (a local folder, or a hub id that can be downloaded or is in the local
cache), and return a `PartMasks`: masks [C, P, H, W] float in {0, 1} (C views of H x W pixels, P
parts; clipseg's output "soft" gives the probabilities), the cameras and the rendered images.

- "clipseg" (`masks_from_clipseg`): `CLIPSegForImageSegmentation` + `CLIPSegProcessor` (default
  "CIDAS/clipseg-rd64-refined"). Each (view, part) pair: the view and the part's phrase (its name,
  or `prompts[part]`) -> logits [352, 352] -> bilinear to [H, W] -> sigmoid; a pixel belongs to the
  part with the highest probability when that probability exceeds `threshold` (0.4).
- "sam" (`masks_from_sam`): `SamModel` + `SamProcessor` (default "facebook/sam-vit-base"), one part
  per call. The click is a 3D point: `point` [x, y, z], or the opacity-weighted centroid of the
  Gaussians in `selection` ([N] bool, or a .npy file such as masks3d/<part>.npy). It is projected
  into every view (pinhole, `Cameras.project`); views where it lies behind the camera (depth below
  `near_plane`) or outside the image get an empty mask; the others get SAM's best mask (highest
  predicted IoU of its 3 outputs) for that click, given in pixel-index coordinates (u - 0.5,
  v - 0.5: SAM adds 0.5 itself), and with `box` also the bounding box of the selected Gaussians'
  projected centres (clipped to the image).

Bad input raises ValueError naming the option: an unknown option, a model folder that does not exist
(or a hub id that cannot be loaded offline), a point behind or outside every view, a selection
of the wrong length; a part empty in every view fails as `check_part_masks` does.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from gendistill.core.cameras import Cameras, load_cameras
from gendistill.core.scene import GaussianScene
from gendistill.splat_edit.part_masks import MASK_SOURCES, PartMasks, render_views

__all__ = ["masks_from_clipseg", "masks_from_sam", "project_point", "selection_centroid", "load_selection",
           "CLIPSEG_MODEL", "SAM_MODEL"]

CLIPSEG_MODEL = "CIDAS/clipseg-rd64-refined"
SAM_MODEL = "facebook/sam-vit-base"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


# ---------------------------------------------------------------------- shared helpers
def _reject_unknown(source: str, unknown: Mapping[str, Any], known: Sequence[str]) -> None:
    if unknown:
        raise ValueError(f"{source} mask source: unknown option(s) {sorted(unknown)}; its options are "
                         f"{', '.join(known)}")


def _device(device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _hub_reachable() -> bool:
    """False when offline mode is on or the hub's host name does not resolve (no network): then a hub id
    that is not in the local cache fails at once instead of after the download retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname or "huggingface.co", 443)
    except OSError:
        return False
    return True


def _load_model(source: str, model, model_cls, processor_cls, device: torch.device):
    """(model, processor) loaded with `from_pretrained` from a local folder or a hub id (the local
    Hugging Face cache first); a clear error naming the option `model` otherwise."""
    text = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
    if text is None:
        raise ValueError(f"{source}: option 'model' must be a folder or a hub id, got {type(model).__name__}")
    path = Path(text).expanduser()
    is_hub_id = not path.exists() and not os.path.isabs(text) and not text.startswith((".", "~")) \
        and _HUB_ID.fullmatch(text) is not None
    if not path.is_dir() and not is_hub_id:
        raise ValueError(f"{source}: option 'model': the model folder {path.absolute()} does not exist (give a "
                         f"folder written by {model_cls.__name__}.save_pretrained plus its processor, or a hub id)")

    def load(where: str, **kw):
        return processor_cls.from_pretrained(where, **kw), model_cls.from_pretrained(where, **kw)

    try:
        if path.is_dir():
            processor, net = load(str(path))
        else:
            try:
                processor, net = load(text, local_files_only=True)
            except (OSError, ValueError):
                if not _hub_reachable():
                    raise OSError(f"no local folder {path.absolute()}, not in the Hugging Face cache, and the hub "
                                  "cannot be reached (offline)") from None
                processor, net = load(text)
    except (OSError, ValueError, KeyError) as err:
        hint = ("" if path.is_dir() else "; without network, download it on a machine with one (`huggingface-cli "
                f"download {text} --local-dir DIR`) and set option 'model' to DIR")
        raise ValueError(f"{source}: option 'model' = {text!r}: cannot load {model_cls.__name__} and "
                         f"{processor_cls.__name__} from it ({type(err).__name__}: {err}){hint}") from None
    return net.to(device).eval(), processor


def _cameras(source: str, cameras) -> Cameras:
    if cameras is None:
        raise ValueError(f"{source}: option 'cameras' is required (a Cameras batch or a camera file / folder)")
    if isinstance(cameras, Cameras):
        return cameras
    if isinstance(cameras, (str, os.PathLike)):
        return load_cameras(cameras)
    raise ValueError(f"{source}: option 'cameras' must be a Cameras batch or a camera file / folder, got "
                     f"{type(cameras).__name__}")


def _views(source: str, scene: GaussianScene | None, cameras: Cameras, images, background, backend) -> Tensor:
    """[C, H, W, 3] float views in [0, 1]: the given images (checked) or the scene rendered at cameras."""
    c, h, w = len(cameras), cameras.height, cameras.width
    if images is None:
        if scene is None:
            raise ValueError(f"{source}: needs a scene to render, or option 'images' [C, H, W, 3]")
        return render_views(scene, cameras, background=background, backend=backend)
    images = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images).float()
    if tuple(images.shape) != (c, h, w, 3):
        raise ValueError(f"{source}: option 'images' must be [C={c}, H={h}, W={w}, 3], got {list(images.shape)}")
    return images


def _uint8(images: Tensor) -> list[np.ndarray]:
    """[C, H, W, 3] floats in [0, 1] -> C uint8 [H, W, 3] arrays (what the processors rescale by 1/255)."""
    return list((images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())


# ---------------------------------------------------------------------- clipseg
CLIPSEG_OPTIONS = ("cameras", "model", "prompts", "threshold", "output", "images", "background", "backend",
                   "device", "batch_size")


@MASK_SOURCES.register("clipseg")
def masks_from_clipseg(scene: GaussianScene | None, parts: Sequence[str], *, cameras=None,
                       model: str | os.PathLike = CLIPSEG_MODEL, prompts: Mapping[str, str] | None = None,
                       threshold: float = 0.4, output: str = "hard", images=None, background=(1.0, 1.0, 1.0),
                       backend: str = "auto", device=None, batch_size: int = 8, **unknown) -> PartMasks:
    """The "clipseg" source: text-prompted masks [C, P, H, W] from CLIPSeg on the views.

    cameras: the C views (`Cameras`, or a camera file / folder). model: folder or hub id of a
    CLIPSegForImageSegmentation with its CLIPSegProcessor. prompts: {part: phrase} (default: the
    part name). threshold: sigmoid probability a pixel must exceed (0.4). output: "hard" (each
    pixel goes to the part with the highest probability, if above threshold: {0, 1} masks) or "soft"
    (the probabilities [0, 1], parts may overlap). images: [C, H, W, 3] views in [0, 1] instead of
    rendering (background, backend: how to render). batch_size: (view, part) pairs per model call.
    """
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    _reject_unknown("clipseg", unknown, CLIPSEG_OPTIONS)
    parts = list(parts)
    prompts = dict(prompts or {})
    extra = sorted(set(prompts) - set(parts))
    if extra:
        raise ValueError(f"clipseg: option 'prompts' names part(s) {extra} that are not among the parts {parts}")
    bad = [p for p, s in prompts.items() if not isinstance(s, str) or not s.strip()]
    if bad:
        raise ValueError(f"clipseg: option 'prompts' must map each part to a non-empty phrase; bad: {bad}")
    if not 0.0 < float(threshold) < 1.0:
        raise ValueError(f"clipseg: option 'threshold' must be in (0, 1), got {threshold}")
    if output not in ("hard", "soft"):
        raise ValueError(f"clipseg: option 'output' must be 'hard' or 'soft', got {output!r}")
    if int(batch_size) < 1:
        raise ValueError(f"clipseg: option 'batch_size' must be at least 1, got {batch_size}")
    cameras = _cameras("clipseg", cameras)
    dev = _device(device)
    net, processor = _load_model("clipseg", model, CLIPSegForImageSegmentation, CLIPSegProcessor, dev)
    views = _views("clipseg", scene, cameras, images, background, backend)
    arrays = _uint8(views)
    phrases = [prompts.get(p, p) for p in parts]
    c, h, w = len(cameras), cameras.height, cameras.width
    probs = torch.zeros(c, len(parts), h, w)
    pairs = [(v, i) for v in range(c) for i in range(len(parts))]
    for s in range(0, len(pairs), int(batch_size)):
        chunk = pairs[s : s + int(batch_size)]
        inputs = processor(text=[phrases[i] for _, i in chunk], images=[arrays[v] for v, _ in chunk], padding=True,
                           return_tensors="pt")
        inputs = {k: t.to(dev) for k, t in inputs.items()}
        with torch.no_grad():
            logits = net(**inputs).logits
        logits = logits.reshape(len(chunk), 1, *logits.shape[-2:]).float()
        up = torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        up = up.sigmoid()[:, 0].cpu()
        for k, (v, i) in enumerate(chunk):
            probs[v, i] = up[k]
    if output == "soft":
        masks = probs
    else:
        best = torch.nn.functional.one_hot(probs.argmax(dim=1), len(parts)).permute(0, 3, 1, 2).bool()
        masks = (best & (probs > float(threshold))).float()
    return PartMasks(parts, masks, cameras, views.cpu())


# ---------------------------------------------------------------------- sam
SAM_OPTIONS = ("cameras", "point", "selection", "box", "model", "multimask", "mask_threshold", "near_plane",
               "images", "background", "backend", "device")


def load_selection(selection, n: int) -> Tensor:
    """The `selection` option as a [n] bool tensor: a bool (or 0 / 1) tensor or array, or a .npy path."""
    if isinstance(selection, (str, os.PathLike)):
        path = Path(selection).expanduser()
        if not path.is_file():
            raise ValueError(f"sam: option 'selection': {path} is not a file (expected a [N] bool .npy such as "
                             "masks3d/<part>.npy)")
        try:
            selection = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"sam: option 'selection': cannot read {path} as .npy: {err}") from None
    t = torch.as_tensor(np.asarray(selection) if not isinstance(selection, Tensor) else selection).cpu()
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"sam: option 'selection' must be one flag per Gaussian, [N={n}], got {list(t.shape)}")
    if t.dtype != torch.bool:
        if t.is_floating_point() or t.is_complex() or not bool(((t == 0) | (t == 1)).all()):
            raise ValueError(f"sam: option 'selection' must be bool (or 0 / 1 integers), got {t.dtype}")
        t = t.bool()
    if not bool(t.any()):
        raise ValueError("sam: option 'selection' selects no Gaussian")
    return t


def selection_centroid(scene: GaussianScene, selection: Tensor) -> Tensor:
    """[3] float64: the opacity-weighted mean of the selected Gaussians' centres."""
    sel = selection.to(scene.device)
    means = scene.means.detach()[sel].double()
    wts = scene.opacities().detach()[sel].double()
    return ((wts[:, None] * means).sum(0) / wts.sum().clamp_min(1e-12)).cpu()


def project_point(cameras: Cameras, points: Tensor, near_plane: float = 0.01) -> tuple[Tensor, Tensor]:
    """Pinhole projection of world points [N, 3] into every view: (pixels [C, N, 2] with pixel centres at
    +0.5, visible [C, N] bool: depth above near_plane and inside the W x H image)."""
    cams = cameras.to("cpu", torch.float64)
    uv, depth = cams.project(torch.as_tensor(points, dtype=torch.float64).reshape(-1, 3))
    inside = (uv[..., 0] >= 0) & (uv[..., 0] < cams.width) & (uv[..., 1] >= 0) & (uv[..., 1] < cams.height)
    return uv, (depth > near_plane) & inside


@MASK_SOURCES.register("sam")
def masks_from_sam(scene: GaussianScene | None, parts: Sequence[str], *, cameras=None, point=None, selection=None,
                   box: bool = False, model: str | os.PathLike = SAM_MODEL, multimask: bool = True,
                   mask_threshold: float = 0.0, near_plane: float = 0.01, images=None, background=(1.0, 1.0, 1.0),
                   backend: str = "auto", device=None, **unknown) -> PartMasks:
    """The "sam" source: masks [C, 1, H, W] of one part from SAM, prompted by a 3D click.

    parts: exactly one name. cameras: the C views (`Cameras`, or a camera file / folder).
    point: the click [x, y, z] in world space; selection: the part's Gaussians ([N] bool tensor /
    array or a .npy path), whose opacity-weighted centroid is the click when `point` is not given;
    box: also prompt with the bounding box of the selected Gaussians' projected centres (needs
    selection). Views where the click is behind the camera (depth <= near_plane) or outside the
    image get an empty mask. model: folder or hub id of a SamModel with its SamProcessor.
    multimask: take the best (highest predicted IoU) of SAM's 3 masks, else its single mask.
    mask_threshold: on SAM's mask logits (0.0). images: [C, H, W, 3] views in [0, 1] instead of
    rendering (background, backend: how to render).
    """
    from transformers import SamModel, SamProcessor

    _reject_unknown("sam", unknown, SAM_OPTIONS)
    parts = list(parts)
    if len(parts) != 1:
        raise ValueError(f"sam: one part per call (one click is one object), got parts {parts}")
    if point is None and selection is None:
        raise ValueError("sam: give option 'point' ([x, y, z] in world space) or option 'selection' "
                         "([N] bool or a masks3d/<part>.npy file)")
    sel = None
    if selection is not None:
        if scene is None:
            raise ValueError("sam: option 'selection' needs the scene its flags index")
        sel = load_selection(selection, scene.num_gaussians)
    if box and sel is None:
        raise ValueError("sam: option 'box' needs option 'selection' (the box bounds the selected Gaussians)")
    if point is not None:
        p = torch.as_tensor(np.asarray(point, dtype=np.float64) if not isinstance(point, Tensor) else point)
        if p.numel() != 3 or not bool(torch.isfinite(p).all()):
            raise ValueError(f"sam: option 'point' must be 3 finite numbers [x, y, z], got {point!r}")
        p, what = p.reshape(3).double().cpu(), "option 'point'"
    else:
        p, what = selection_centroid(scene, sel), "the opacity-weighted centroid of option 'selection'"
    cameras = _cameras("sam", cameras)
    uv, visible = project_point(cameras, p[None], near_plane)
    uv, visible = uv[:, 0], visible[:, 0]
    if not bool(visible.any()):
        raise ValueError(f"sam: the click ({what}, {[round(float(x), 4) for x in p]}) is behind or outside every one "
                         f"of the {len(cameras)} views; no view to prompt")
    sel_uv = sel_vis = None
    if box:
        means = scene.means.detach()[sel.to(scene.device)].cpu()
        sel_uv, sel_depth = cameras.to("cpu", torch.float64).project(means.double())
        sel_vis = sel_depth > near_plane
    dev = _device(device)
    net, processor = _load_model("sam", model, SamModel, SamProcessor, dev)
    views = _views("sam", scene, cameras, images, background, backend)
    arrays = _uint8(views)
    c, h, w = len(cameras), cameras.height, cameras.width
    masks = torch.zeros(c, 1, h, w)
    dtype = next(net.parameters()).dtype
    for v in torch.nonzero(visible).flatten().tolist():
        kw = {"input_points": [[(uv[v] - 0.5).tolist()]], "input_labels": [[1]]}
        if box and bool(sel_vis[v].any()):
            q = sel_uv[v][sel_vis[v]] - 0.5
            lo = torch.stack([q[:, 0].min().clamp(0, w - 1), q[:, 1].min().clamp(0, h - 1)])
            hi = torch.stack([q[:, 0].max().clamp(0, w - 1), q[:, 1].max().clamp(0, h - 1)])
            kw["input_boxes"] = [[torch.cat([lo, hi]).tolist()]]
        inputs = processor(images=[arrays[v]], return_tensors="pt", **kw)
        sizes = inputs.pop("original_sizes"), inputs.pop("reshaped_input_sizes")
        inputs = {k: t.to(dev, dtype) if t.is_floating_point() else t.to(dev) for k, t in inputs.items()}
        with torch.no_grad():
            out = net(**inputs, multimask_output=bool(multimask))
        pred = out.pred_masks[0, 0].float()  # [K, h', w'] logits
        k = int(out.iou_scores[0, 0].argmax()) if pred.shape[0] > 1 else 0
        full = processor.post_process_masks([pred[None, k : k + 1].cpu()], *sizes, binarize=False)[0]
        masks[v, 0] = (full[0, 0] > float(mask_threshold)).float()
    return PartMasks(parts, masks, cameras, views.cpu())
