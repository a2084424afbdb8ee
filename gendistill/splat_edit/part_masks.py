"""Multi-view 2D part masks for 3D-GALP, from one interface: the `MASK_SOURCES` registry.

Every source returns a `PartMasks` (masks [C, P, H, W] in [0, 1], the cameras they belong to, the
part names) and is called as `source(scene, parts, **options)`; `get_part_masks(name, ...)` looks
one up. Entries:

- "files": a mask folder, `DIR/transforms.json` (nerfstudio / instant-ngp) or a COLMAP text model,
  and `DIR/masks/<part>/<stem of each view's file>.png`, white where the part is
  (`load_mask_folder`; `write_mask_folder` renders such a folder from a scene with known parts).
- "attention": attention maps of the part words from a diffusers pipeline on rendered views,
  captured through attention processors, post-processed as RoMaP does (`attention_maps`,
  `postprocess_attention`). Capture "romap" (SD3Transformer2DModel pipelines, their default):
  RoMaP's text-to-image scores during a controlled inversion (`romap_attention`); capture "ours"
  (the default for UNet2DConditionModel pipelines, with a VAE or pixel-space): image-to-text
  attention probabilities after one noising.
- "callable": any function `fn(images [C, H, W, 3] float in [0, 1], parts) -> [C, P, H, W]`
  (any other segmenter).
- "clipseg" (`segmenters.masks_from_clipseg`): text-prompted masks from transformers' CLIPSeg on
  rendered views, one phrase per part (its name or `prompts[part]`), sigmoid above `threshold`.
- "sam" (`segmenters.masks_from_sam`): one part from transformers' SAM, prompted by a 3D click
  (`point`, or the centroid of a Gaussian `selection`, optionally its box) projected into each
  view; views where it is behind the camera or off the image get an empty mask.

Bad input fails loudly, naming the part and the views: a missing or extra mask file, a mask whose
size is not the cameras', a part empty in every view, a part word not in the prompt.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from gendistill.core.cameras import Cameras, load_cameras
from gendistill.core.io import atomic_path
from gendistill.core.render import rasterize
from gendistill.core.scene import GaussianScene
from gendistill.registry import Registry

__all__ = [
    "MASK_SOURCES", "PartMasks", "get_part_masks", "check_part_masks", "load_mask_folder", "write_mask_folder",
    "truth_part_masks", "scene_part_ids", "render_views", "masks_from_folder", "masks_from_attention",
    "masks_from_callable", "attention_maps", "postprocess_attention", "part_token_indices", "AttentionCapture",
    "resolve_capture", "CAPTURES", "CAPTURE_DEFAULTS",
]

MASK_SOURCES = Registry("part-mask source")
_GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])


@dataclass
class PartMasks:
    """Masks of P parts in C views.

    Attributes:
        parts: P part names. masks: [C, P, H, W] float in [0, 1]. cameras: the C views (H x W).
        images: optional [C, H, W, 3] RGB views in [0, 1] the masks were made from.
    """

    parts: list[str]
    masks: Tensor
    cameras: Cameras
    images: Tensor | None = None

    def __post_init__(self):
        self.parts = list(self.parts)
        check_part_masks(self.masks, self.parts, self.cameras)


def _view_names(cameras: Cameras) -> list[str]:
    return list(cameras.names) if cameras.names is not None else [f"view {i}" for i in range(len(cameras))]


def _few(items: Sequence[str], k: int = 5) -> str:
    items = list(items)
    return ", ".join(items[:k]) + (f", ... ({len(items)} in all)" if len(items) > k else "")


def check_part_masks(masks: Tensor, parts: Sequence[str], cameras: Cameras) -> None:
    """Raise ValueError unless masks is [C, P, H, W] for these cameras and parts, and no part is
    empty in every view (the message names the part and the views)."""
    parts = list(parts)
    if not parts:
        raise ValueError("no parts given")
    if len(set(parts)) != len(parts):
        raise ValueError(f"part names must be unique, got {parts}")
    if not isinstance(masks, Tensor) or masks.dim() != 4:
        raise ValueError(f"part masks must be a [C, P, H, W] tensor, got {getattr(masks, 'shape', type(masks))}")
    c, p, h, w = masks.shape
    if c != len(cameras):
        raise ValueError(f"there are masks for {c} views but {len(cameras)} cameras")
    if p != len(parts):
        raise ValueError(f"masks have {p} part channels for {len(parts)} parts {parts}")
    if (h, w) != (cameras.height, cameras.width):
        raise ValueError(f"masks are {w}x{h} but the cameras are {cameras.width}x{cameras.height}")
    empty = ~(masks > 0.5).flatten(2).any(dim=2)  # [C, P]
    for i, name in enumerate(parts):
        if bool(empty[:, i].all()):
            raise ValueError(f"part {name!r} is empty in every view ({_few(_view_names(cameras))}); "
                             "nothing to segment (check the part name, the masks or the prompt)")


def get_part_masks(source: str, scene: GaussianScene | None, parts: Sequence[str], **options) -> PartMasks:
    """Part masks from the registered source `source` ("files", "attention", "callable", "clipseg", "sam",
    or a plugin's)."""
    return MASK_SOURCES.get_entry(source)(scene, list(parts), **options)


# ---------------------------------------------------------------------- mask folders
def _read_mask(path: Path) -> np.ndarray:
    import imageio.v3 as iio

    try:
        im = np.asarray(iio.imread(path))
    except Exception as err:  # imageio raises many types
        raise ValueError(f"cannot read mask image {path}: {err}") from None
    if im.ndim == 3:
        im = im[..., : min(3, im.shape[-1])].mean(axis=-1) if im.shape[-1] != 2 else im[..., 0]
    if im.dtype == np.bool_:
        return im.astype(np.float32)
    scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(im.dtype, 1.0)
    return np.clip(im.astype(np.float32) / scale, 0.0, 1.0)


def load_mask_folder(path: str | os.PathLike, parts: Sequence[str] | None = None) -> PartMasks:
    """Read a mask folder: cameras from DIR/transforms.json (or a COLMAP text model in DIR) and
    DIR/masks/<part>/<stem>.png per view (stem of the frame's file_path / COLMAP image name).

    `parts` defaults to every sub-folder of DIR/masks, sorted. Raises ValueError naming the part
    and views for missing or extra files and wrong sizes; FileNotFoundError for a missing folder.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such mask folder")
    cameras = load_cameras(root)
    mask_root = root / "masks"
    if not mask_root.is_dir():
        raise FileNotFoundError(f"{root}: no masks/ folder (expected masks/<part>/<view>.png)")
    available = sorted(d.name for d in mask_root.iterdir() if d.is_dir())
    parts = available if parts is None else list(parts)
    if not parts:
        raise ValueError(f"{mask_root}: no part folders")
    names = _view_names(cameras)
    stems = [Path(n).stem for n in names]
    if len(set(stems)) != len(stems):
        raise ValueError(f"{root}: views share file stems, so masks/<part>/<stem>.png is ambiguous")
    h, w = cameras.height, cameras.width
    out = torch.zeros(len(cameras), len(parts), h, w)
    for j, part in enumerate(parts):
        pdir = mask_root / part
        if not pdir.is_dir():
            raise ValueError(f"part {part!r}: no folder {pdir} (parts with masks: {available})")
        files = {f.stem: f for f in pdir.iterdir() if f.suffix.lower() == ".png"}
        missing = [s for s in stems if s not in files]
        extra = sorted(set(files) - set(stems))
        if missing or extra:
            msg = f"part {part!r}: {len(files)} mask files in {pdir} for {len(stems)} cameras"
            if missing:
                msg += f"; missing views: {_few(missing)}"
            if extra:
                msg += f"; masks of no camera: {_few(extra)}"
            raise ValueError(msg)
        bad = []
        for i, s in enumerate(stems):
            m = _read_mask(files[s])
            if m.shape != (h, w):
                bad.append(f"{files[s].name} is {m.shape[1]}x{m.shape[0]}")
                continue
            out[i, j] = torch.from_numpy(m)
        if bad:
            raise ValueError(f"part {part!r}: masks do not match the cameras' size {w}x{h}: {_few(bad)}")
    return PartMasks(parts, out, cameras)


@MASK_SOURCES.register("files")
def masks_from_folder(scene: GaussianScene | None, parts: Sequence[str] | None, *, path: str | os.PathLike,
                      **_) -> PartMasks:
    """The "files" source: `load_mask_folder(path, parts)` (the scene is not needed)."""
    return load_mask_folder(path, parts)


def scene_part_ids(scene: GaussianScene, part_attr: str = "part") -> tuple[Tensor, list[str]]:
    """The per-Gaussian part ids [N] and the part names of a scene with a known `part` property
    (names from the `part_names:` comment, else "part0", "part1", ...)."""
    if part_attr not in scene.extras:
        raise ValueError(f"the scene has no per-Gaussian {part_attr!r} property (has: {sorted(scene.extras)})")
    ids = scene.extras[part_attr].long()
    names = scene.metadata().get(f"{part_attr}_names", "").split()
    n = int(ids.max()) + 1 if len(ids) else 0
    if len(names) < n:
        names = names + [f"part{i}" for i in range(len(names), n)]
    return ids, names


def render_views(scene: GaussianScene, cameras: Cameras, *, background=(1.0, 1.0, 1.0), backend: str = "auto",
                 chunk: int = 8) -> Tensor:
    """[C, H, W, 3] RGB renders in [0, 1]."""
    out = []
    with torch.no_grad():
        for s in range(0, len(cameras), chunk):
            cams = cameras[list(range(s, min(s + chunk, len(cameras))))]
            bg = torch.tensor(background, dtype=scene.means.dtype, device=scene.device).expand(len(cams), 3)
            img, _, _ = scene.render(cams, backgrounds=bg.contiguous(), backend=backend)
            out.append(img.clamp(0, 1))
    return torch.cat(out)


def truth_part_masks(scene: GaussianScene, cameras: Cameras, part_ids: Tensor, n_parts: int | None = None, *,
                     backend: str = "auto", chunk: int = 8) -> Tensor:
    """[C, P, H, W] float {0, 1} masks from known per-Gaussian part ids [N]: a pixel belongs to the
    part with the largest composited one-hot weight, where the Gaussians' alpha exceeds 0.5."""
    n_parts = int(part_ids.max()) + 1 if n_parts is None else n_parts
    a = scene.render_args()
    onehot = torch.nn.functional.one_hot(part_ids.long().clamp_min(0), n_parts).to(scene.means.dtype)
    onehot[part_ids < 0] = 0
    out = []
    with torch.no_grad():
        for s in range(0, len(cameras), chunk):
            cams = cameras[list(range(s, min(s + chunk, len(cameras))))].to(scene.device, scene.means.dtype)
            feat, alpha, _ = rasterize(a["means"], a["quats"], a["scales"], a["opacities"], onehot, cams.viewmats,
                                       cams.Ks, cams.width, cams.height, backend=backend)
            best = feat.argmax(dim=-1)  # [c, H, W]
            m = torch.nn.functional.one_hot(best, n_parts).to(feat.dtype) * (alpha > 0.5).to(feat.dtype)
            out.append(m.permute(0, 3, 1, 2))
    return torch.cat(out)


def write_mask_folder(scene: GaussianScene, cameras: Cameras, out: str | os.PathLike, *,
                      parts: Sequence[str] | None = None, part_attr: str = "part", masks: Tensor | None = None,
                      background=(1.0, 1.0, 1.0), backend: str = "auto") -> Path:
    """Write a mask folder for a scene with a known per-Gaussian `part` property:
    OUT/transforms.json (nerfstudio, OpenGL camera-to-world, per-frame intrinsics), OUT/images/*.png
    (RGB renders) and OUT/masks/<part>/*.png (white where the part is). `parts` selects parts by
    name (default all); `masks` [C, P_all, H, W] replaces the rendered truth (e.g. a noisy variant).
    Returns OUT.
    """
    from gendistill.core.media import write_image

    out = Path(out)
    ids, names = scene_part_ids(scene, part_attr)
    parts = names if parts is None else list(parts)
    unknown = [p for p in parts if p not in names]
    if unknown:
        raise ValueError(f"part(s) {unknown} are not in the scene (parts: {names})")
    if masks is None:
        masks = truth_part_masks(scene, cameras, ids, len(names), backend=backend)
    images = render_views(scene, cameras, background=background, backend=backend)
    frames = []
    c2w = torch.linalg.inv(cameras.viewmats.double()).cpu().numpy()
    for i in range(len(cameras)):
        stem = f"view_{i:03d}"
        write_image(out / "images" / f"{stem}.png", images[i])
        for p in parts:
            write_image(out / "masks" / p / f"{stem}.png", masks[i, names.index(p), :, :, None].float())
        k = cameras.Ks[i].double().cpu().numpy()
        frames.append({"file_path": f"images/{stem}.png", "transform_matrix": (c2w[i] @ _GL_TO_CV).tolist(),
                       "fl_x": k[0, 0], "fl_y": k[1, 1], "cx": k[0, 2], "cy": k[1, 2]})
    meta = {"w": cameras.width, "h": cameras.height, "camera_model": "OPENCV", "parts": parts, "frames": frames}
    with atomic_path(out / "transforms.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1))
    return out


# ---------------------------------------------------------------------- callables
@MASK_SOURCES.register("callable")
def masks_from_callable(scene: GaussianScene, parts: Sequence[str], *, fn: Callable, cameras: Cameras,
                        images: Tensor | None = None, background=(1.0, 1.0, 1.0), backend: str = "auto",
                        **_) -> PartMasks:
    """The "callable" source: `fn(images [C, H, W, 3] in [0, 1], parts) -> [C, P, H, W]` (tensor or
    array; bool, or float in [0, 1]) on the scene rendered at `cameras` (or the given `images`)."""
    if images is None:
        images = render_views(scene, cameras, background=background, backend=backend)
    got = fn(images, list(parts))
    got = torch.as_tensor(np.asarray(got) if not isinstance(got, Tensor) else got)
    c, h, w = len(cameras), cameras.height, cameras.width
    if tuple(got.shape) != (c, len(parts), h, w):
        raise ValueError(f"the mask callable returned shape {list(got.shape)}, expected [C={c}, P={len(parts)}, "
                         f"H={h}, W={w}] for parts {list(parts)}")
    return PartMasks(list(parts), got.float().clamp(0, 1).cpu(), cameras, images)


# ---------------------------------------------------------------------- attention maps
def _tokenize(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def part_token_indices(tokenizer, prompt: str, part: str, max_length: int | None = None,
                       add_bos: bool = True) -> list[int]:
    """Positions of `part`'s tokens in the tokenized `prompt` (counting the start token when
    `add_bos`), all occurrences, within `max_length`. Raises ValueError when the part is not in it."""
    ids = _tokenize(tokenizer, prompt)
    word = _tokenize(tokenizer, part)
    if not word:
        raise ValueError(f"part {part!r} gives no tokens")
    off = 1 if add_bos else 0
    hits = [i + off + j for i in range(len(ids) - len(word) + 1) if ids[i : i + len(word)] == word
            for j in range(len(word))]
    if max_length is not None:
        hits = [h for h in hits if h < max_length - 1]  # the last position holds the end token
    if not hits:
        raise ValueError(f"part {part!r} is not in the prompt {prompt!r}"
                         + (" (or lies past the tokenizer's length)" if max_length else ""))
    return hits


class AttentionCapture:
    """Context manager: swaps every attention processor of `model` (UNet2DConditionModel or
    SD3Transformer2DModel) for a wrapper that records image-to-text attention probabilities of the
    text positions `token_ids`, then calls the original processor. Restores them on exit.

    `maps` collects [B, Nq, T] tensors (head-averaged; T = len(token_ids)), one per attention call
    with text keys.
    """

    def __init__(self, model, token_ids: Sequence[int]):
        self.model, self.token_ids = model, list(token_ids)
        self.maps: list[Tensor] = []
        self._saved = None

    def __enter__(self) -> "AttentionCapture":
        self._saved = dict(self.model.attn_processors)
        self.model.set_attn_processor({k: _CaptureProcessor(v, self) for k, v in self._saved.items()})
        return self

    def __exit__(self, *exc) -> None:
        self.model.set_attn_processor(self._saved)

    def record(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor) -> None:
        if hidden_states.dim() != 3:
            return
        b = hidden_states.shape[0]
        heads = attn.heads
        q = attn.to_q(hidden_states)
        if getattr(attn, "add_k_proj", None) is not None:  # joint (SD3): keys are [image; text]
            k_img = attn.to_k(hidden_states)
            k_txt = attn.add_k_proj(encoder_hidden_states)
            q, k_img, k_txt = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k_img, k_txt))
            if attn.norm_q is not None:
                q = attn.norm_q(q)
            if attn.norm_k is not None:
                k_img = attn.norm_k(k_img)
            if getattr(attn, "norm_added_k", None) is not None:
                k_txt = attn.norm_added_k(k_txt)
            k = torch.cat([k_img, k_txt], dim=2)
            n_img = k_img.shape[2]
        else:  # cross-attention (UNet)
            ehs = encoder_hidden_states
            if getattr(attn, "norm_cross", None) is not None:
                ehs = attn.norm_encoder_hidden_states(ehs)
            k = attn.to_k(ehs)
            q, k = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k))
            if getattr(attn, "norm_q", None) is not None:
                q = attn.norm_q(q)
            if getattr(attn, "norm_k", None) is not None:
                k = attn.norm_k(k)
            n_img = 0
        scale = attn.scale if getattr(attn, "scale", None) else q.shape[-1] ** -0.5
        probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)  # [B, h, Nq, Nk]
        cols = [n_img + t for t in self.token_ids if n_img + t < probs.shape[-1]]
        if len(cols) != len(self.token_ids):
            raise ValueError(f"attention has {probs.shape[-1] - n_img} text positions; token positions "
                             f"{self.token_ids} do not all fit")
        self.maps.append(probs[..., cols].mean(dim=1).detach())


class _CaptureProcessor:
    """Records attention for an `AttentionCapture`, then defers to the wrapped processor."""

    def __init__(self, inner, capture: AttentionCapture):
        self.inner, self.capture = inner, capture

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if encoder_hidden_states is not None:
            self.capture.record(attn, hidden_states, encoder_hidden_states)
        if temb is not None:
            kwargs["temb"] = temb
        return self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                          attention_mask=attention_mask, *args, **kwargs)


CAPTURES = ("auto", "romap", "ours")
ROMAP_OPTIONS = ("t_range", "inversion_steps", "capture_step", "gamma", "blocks")
OUTPUTS = ("hard", "soft", "normalized")
# per capture: softmax temperature, render background, postprocess output (romap.py :1120, :799, :1133)
CAPTURE_DEFAULTS = {"romap": (0.2, (0.0, 0.0, 0.0), "soft"), "ours": (1.0, (1.0, 1.0, 1.0), "hard")}


def _pipeline_kind(pipe) -> str:
    """"unet" (a UNet2DConditionModel denoising VAE latents or, without a VAE, RGB pixels) or "sd3"."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    unet = getattr(pipe, "unet", None)
    if isinstance(unet, UNet2DConditionModel):
        vae = getattr(pipe, "vae", None)
        want = vae.config.latent_channels if vae is not None else 3
        if unet.config.in_channels != want:
            space = "VAE latent" if vae is not None else "RGB (no VAE)"
            raise ValueError(f"the UNet of {type(pipe).__name__} takes {unet.config.in_channels} input channels, "
                             f"not the {want} {space} channels; attention masks need a UNet that denoises the "
                             "image alone (not an InstructPix2Pix-style one)")
        if getattr(unet.config, "cross_attention_dim", None) is None:
            raise ValueError(f"the UNet of {type(pipe).__name__} has no cross-attention to a text encoder")
        return "unet"
    if isinstance(getattr(pipe, "transformer", None), SD3Transformer2DModel):
        return "sd3"
    raise ValueError(f"attention masks need a pipeline with a cross-attention UNet2DConditionModel (latent or "
                     f"pixel space) or an SD3Transformer2DModel, got {type(pipe).__name__}")


def resolve_capture(capture: str, pipe) -> str:
    """The capture mode for `pipe`: "auto" is what its guidance kind declares (`Guidance.attention_capture`:
    "romap" for SD3 transformers, "ours" for UNets)."""
    from gendistill.core.guidance import GUIDANCE, detect_kind

    if capture not in CAPTURES:
        raise ValueError(f"capture must be one of {CAPTURES}, got {capture!r}")
    kind = detect_kind(pipe)
    own = GUIDANCE.get_entry(kind).attention_capture
    if own is None:
        raise ValueError(f"guidance kind {kind!r} ({type(pipe).__name__}) declares no attention capture")
    if capture == "auto":
        return own
    if capture == "romap" and own != "romap":
        raise ValueError("capture='romap' (text-to-image scores of a rectified-flow inversion) needs an SD3-style "
                         "transformer pipeline; use capture='ours' for UNets")
    return capture


def _token_positions(pipe, kind: str, prompt: str, parts: Sequence[str], t5: bool = True) -> dict[str, list[int]]:
    """Text positions of each part in the denoiser's text sequence (CLIP tokens; for SD3 with `t5`
    also the T5 tokens when a T5 encoder is present, offset after the CLIP ones)."""
    tok = pipe.tokenizer
    if tok is None:
        raise ValueError(f"{type(pipe).__name__} has no tokenizer to find the part words with")
    out = {}
    for p in parts:
        pos = part_token_indices(tok, prompt, p, tok.model_max_length)
        if t5 and kind == "sd3" and getattr(pipe, "tokenizer_3", None) is not None and pipe.text_encoder_3 is not None:
            try:
                t5_pos = part_token_indices(pipe.tokenizer_3, prompt, p, 256, add_bos=False)
                pos += [tok.model_max_length + i for i in t5_pos]
            except ValueError:
                pass
        out[p] = pos
    return out


def _vae_factor(pipe) -> int:
    vae = getattr(pipe, "vae", None)
    return 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)


def _to_model_space(pipe, x: Tensor, dtype) -> Tensor:
    """Images x [B, 3, h, w] in [0, 1] -> the denoiser's input space: the VAE mean (shifted and
    scaled), or 2 x - 1 for a pixel-space model."""
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return (x * 2 - 1).to(dtype)
    lat = vae.encode((x * 2 - 1).to(vae.dtype)).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((lat - shift) * vae.config.scaling_factor).to(dtype)


def _prompt_embeds(pipe, prompt: str, device) -> dict[str, Tensor]:
    """The denoiser's text inputs for `prompt` (encoder_hidden_states [1, T, D], and for SD3
    pooled_projections [1, D'])."""
    from gendistill.core.guidance.prompts import encoder_for

    enc = encoder_for(pipe, device)
    if enc is None:
        raise ValueError(f"{type(pipe).__name__} has no text encoder; attention masks need a text-conditioned model")
    return enc(prompt, "")[0]


def _ours_maps(pipe, kind: str, images: Tensor, prompt: str, parts: list[str], timesteps: Sequence[float],
               resolution: int | None, seed: int, batch_size: int) -> Tensor:
    """Capture "ours": raw maps [C, P, H, W] (see `attention_maps`)."""
    positions = _token_positions(pipe, kind, prompt, parts)
    flat = sorted({i for v in positions.values() for i in v})
    model = pipe.unet if kind == "unet" else pipe.transformer
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    c, h, w = images.shape[:3]
    if resolution is None:
        resolution = model.config.sample_size * _vae_factor(pipe)
    gen = torch.Generator().manual_seed(seed)
    embeds = _prompt_embeds(pipe, prompt, device)
    x = images.permute(0, 3, 1, 2).to(device, torch.float32)
    x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True,
                                        align_corners=False)
    out = []
    for s in range(0, c, batch_size):
        lat = _to_model_space(pipe, x[s : s + batch_size], dtype)
        b, (lh, lw) = lat.shape[0], lat.shape[-2:]
        kw = {k: v.expand(b, *v.shape[1:]).to(dtype) for k, v in embeds.items()}
        acc = torch.zeros(b, len(flat), lh, lw, device=device)
        n_acc = 0
        for frac in timesteps:
            noise = torch.randn(lat.shape, generator=gen).to(device, dtype)
            with AttentionCapture(model, flat) as cap:
                if kind == "unet":
                    n_train = pipe.scheduler.config.num_train_timesteps
                    t = torch.full((b,), int(round(frac * (n_train - 1))), device=device, dtype=torch.long)
                    model(pipe.scheduler.add_noise(lat, noise, t), t, **kw)
                else:
                    t = torch.full((b,), frac * pipe.scheduler.config.num_train_timesteps, device=device)
                    model(hidden_states=(1 - frac) * lat + frac * noise, timestep=t, **kw)
            for m in cap.maps:  # [b, Nq, T]
                f = math.sqrt(lh * lw / m.shape[1])
                gh, gw = round(lh / f), round(lw / f)
                if gh * gw != m.shape[1]:
                    continue
                grid = m.transpose(1, 2).reshape(b, len(flat), gh, gw)
                acc += torch.nn.functional.interpolate(grid, size=(lh, lw), mode="bilinear", align_corners=False)
                n_acc += 1
        if n_acc == 0:
            raise RuntimeError(f"no image-to-text attention was captured from {type(model).__name__}")
        acc /= n_acc
        per_part = torch.stack([acc[:, [flat.index(i) for i in positions[p]]].mean(dim=1) for p in parts], 1)
        out.append(torch.nn.functional.interpolate(per_part, size=(h, w), mode="bilinear", align_corners=False))
    return torch.cat(out).float().cpu()


def attention_maps(pipe, images: Tensor, prompt: str, parts: Sequence[str], *, capture: str = "auto",
                   resolution: int | None = None, seed: int = 0, batch_size: int = 4,
                   timesteps: Sequence[float] | None = None, **romap_options) -> Tensor:
    """Raw attention maps [C, P, H, W] of the part words of `prompt` on images [C, H, W, 3] in [0, 1].

    capture "romap" (the default for SD3 transformers; `romap_attention.romap_attention_maps`):
    RoMaP's pre-softmax text-to-image scores at CLIP positions, summed over blocks 0..n-2, at the
    4th model call of a 5-step controlled inversion of a VAE sample, 512 px (or `resolution`);
    `romap_options`: t_range, inversion_steps, capture_step, gamma, blocks.

    capture "ours" (the default for UNets, latent or pixel space): the images are resized to
    `resolution` (default: the denoiser's native size), encoded (VAE mean, or 2 x - 1 without a
    VAE), noised to each fraction t of the schedule in `timesteps` (default (0.5,); DDPM-style for
    UNets, x_t = (1 - t) x_0 + t n for SD3) and denoised once with the prompt; the image-to-text
    softmax attention of every layer (CLIP and T5 positions) is head-averaged, resized to the
    latent grid and averaged over layers, timesteps and the part's tokens.

    Either way the maps are resized (bilinear) to H x W.
    """
    parts = list(parts)
    kind = _pipeline_kind(pipe)
    capture = resolve_capture(capture, pipe)
    unknown = sorted(set(romap_options) - set(ROMAP_OPTIONS))
    if unknown:
        raise ValueError(f"attention capture: unknown option(s) {unknown}; capture 'romap' takes {ROMAP_OPTIONS}, "
                         "'ours' takes timesteps")
    if capture == "ours":
        if romap_options:
            raise ValueError(f"option(s) {sorted(romap_options)} are for capture='romap', not 'ours'")
        return _ours_maps(pipe, kind, images, prompt, parts, (0.5,) if timesteps is None else timesteps,
                          resolution, seed, batch_size)
    if timesteps is not None:
        raise ValueError("option 'timesteps' is for capture='ours'; capture='romap' takes "
                         f"{', '.join(ROMAP_OPTIONS)}")
    from gendistill.splat_edit.romap_attention import romap_attention_maps

    positions = _token_positions(pipe, kind, prompt, parts, t5=False)
    raw = romap_attention_maps(pipe, images, prompt, [positions[p] for p in parts], resolution=resolution,
                               seed=seed, batch_size=batch_size, **romap_options)
    return torch.nn.functional.interpolate(raw, size=tuple(images.shape[1:3]), mode="bilinear", align_corners=False)


def _minmax(x: Tensor) -> Tensor:
    """Min-max normalise [..., H, W] over its last two dimensions (a constant map gives 0)."""
    flat = x.flatten(-2)
    lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(x)


def postprocess_attention(maps: Tensor, temperatures: float | Sequence[float] = 1.0, threshold: float = 0.5,
                          output: str = "hard", *, refine: Callable | None = None,
                          images: Tensor | None = None) -> Tensor:
    """RoMaP-style post-processing of raw maps [C, P, H, W] into masks [C, P, H, W] in [0, 1].

    Per view and part (`normalize_tensor`, romap.py :433-454): min-max normalise, softmax over the
    part's H x W pixels with the part's temperature, min-max again. With `refine(image [3, H, W],
    map [H, W]) -> [H, W]` (RoMaP: CascadePSP; `images` [C, H, W, 3] in [0, 1] are the views), the
    refined map, min-max normalised (:1124-1130). Then by `output`:

    - "hard": pixels above `threshold` form the mask, earlier-listed parts claim pixels first;
    - "soft" (RoMaP, :1133): the soft values, zeroed where the earlier parts' (already zeroed)
      values sum above `threshold` (RoMaP weighs each earlier part by the channel sum of its
      colour code: the same for the first three parts, whose codes are one-hot);
    - "normalized": the maps before any claiming.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    c, p = maps.shape[:2]
    temps = [temperatures] * p if np.isscalar(temperatures) else list(temperatures)
    temps = torch.as_tensor(temps, dtype=torch.float32)
    if temps.shape != (p,) or (temps <= 0).any():
        raise ValueError(f"temperatures must be positive, one per part ({p}), got {temperatures}")
    a = _minmax(maps.float())
    a = _minmax(torch.softmax(a.flatten(2) / temps[None, :, None], dim=-1).view_as(a))
    if refine is not None:
        a = _refined(a, refine, images)
    if output == "normalized":
        return a
    out = torch.zeros_like(a)
    if output == "soft":
        for i in range(p):
            out[:, i] = torch.where(out[:, :i].sum(dim=1) > threshold, 0.0, a[:, i])
        return out
    free = torch.ones(c, *a.shape[2:], dtype=torch.bool)
    for i in range(p):
        take = (a[:, i] > threshold) & free
        out[:, i] = take.float()
        free &= ~take
    return out


def _refined(a: Tensor, refine: Callable, images: Tensor | None) -> Tensor:
    """Apply `refine` to every view and part of maps a [C, P, H, W], min-max normalising each result."""
    c, p, h, w = a.shape
    if images is None or tuple(images.shape) != (c, h, w, 3):
        raise ValueError(f"refine needs the views: images [C={c}, H={h}, W={w}, 3], got "
                         f"{None if images is None else list(images.shape)}")
    out = torch.empty_like(a)
    for v in range(c):
        img = images[v].permute(2, 0, 1).float().cpu()
        for i in range(p):
            got = torch.as_tensor(np.asarray(refine(img, a[v, i]))).float().squeeze()
            if tuple(got.shape) != (h, w):
                raise ValueError(f"refine returned shape {list(got.shape)} for a [{h}, {w}] mask")
            out[v, i] = _minmax(got)
    return out


@MASK_SOURCES.register("attention")
def masks_from_attention(scene: GaussianScene, parts: Sequence[str], *, pipeline, prompt: str, cameras: Cameras,
                         capture: str = "auto", temperatures: float | Sequence[float] | None = None,
                         threshold: float = 0.5, output: str | None = None, refine=None,
                         resolution: int | None = None, seed: int = 0, background=None, backend: str = "auto",
                         device=None, timesteps: Sequence[float] | None = None, **romap_options) -> PartMasks:
    """The "attention" source: render the scene at `cameras`, take the part words' attention maps
    from `pipeline` (a loaded diffusers pipeline, a local folder or a hub id) with `prompt`
    (`attention_maps`: capture, resolution, seed, timesteps, romap options), and post-process them
    (`postprocess_attention`: temperatures, threshold, output, refine).

    capture "auto" is "romap" for SD3 transformers and "ours" for UNets. Left as None,
    temperatures / background / output follow the capture: "romap" 0.2, black, "soft" (RoMaP);
    "ours" 1.0, white, "hard". refine: None, a callable `refine(image [3, H, W], mask [H, W])`,
    "cascadepsp" or "module:function" (`romap_attention.refiner`).
    """
    from gendistill.core.guidance.load import load_pipeline
    from gendistill.splat_edit.romap_attention import refiner

    unknown = sorted(set(romap_options) - set(ROMAP_OPTIONS))
    if unknown:
        raise ValueError(f"attention mask source: unknown option(s) {unknown}")
    pipe = load_pipeline(pipeline, device=device)
    _pipeline_kind(pipe)  # a clear error for a pipeline without usable attention
    mode = resolve_capture(capture, pipe)
    temp0, bg0, out0 = CAPTURE_DEFAULTS[mode]
    refine_fn = refiner(refine)
    images = render_views(scene, cameras, background=bg0 if background is None else background, backend=backend)
    raw = attention_maps(pipe, images, prompt, parts, capture=mode, timesteps=timesteps, resolution=resolution,
                         seed=seed, **romap_options)
    masks = postprocess_attention(raw, temp0 if temperatures is None else temperatures, threshold,
                                  out0 if output is None else output, refine=refine_fn, images=images.cpu())
    return PartMasks(list(parts), masks, cameras, images)


from gendistill.splat_edit import segmenters as _segmenters  # noqa: E402,F401  registers "clipseg" and "sam"
