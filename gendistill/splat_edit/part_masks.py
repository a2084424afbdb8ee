"""Multi-view 2D part masks for 3D-GALP, from one interface: the `MASK_SOURCES` registry.

Every source returns a `PartMasks` (masks [C, P, H, W] in [0, 1], the cameras they belong to, the
part names) and is called as `source(scene, parts, **options)`; `get_part_masks(name, ...)` looks
one up. Entries:

- "files": a mask folder, `DIR/transforms.json` (nerfstudio / instant-ngp) or a COLMAP text model,
  and `DIR/masks/<part>/<stem of each view's file>.png`, white where the part is
  (`load_mask_folder`; `write_mask_folder` renders such a folder from a scene with known parts).
- "attention": attention maps of the part words from a diffusers pipeline on rendered views,
  captured through attention processors (cross-attention of UNet2DConditionModel pipelines, joint
  attention of SD3Transformer2DModel pipelines), post-processed as RoMaP does
  (`attention_maps`, `postprocess_attention`).
- "callable": any function `fn(images [C, H, W, 3] float in [0, 1], parts) -> [C, P, H, W]`
  (SAM or another segmenter).

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
    """Part masks from the registered source `source` ("files", "attention", "callable", or a plugin's)."""
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


def _pipeline_kind(pipe) -> str:
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    if isinstance(getattr(pipe, "unet", None), UNet2DConditionModel) and getattr(pipe, "vae", None) is not None:
        return "unet"
    if isinstance(getattr(pipe, "transformer", None), SD3Transformer2DModel):
        return "sd3"
    raise ValueError(f"attention masks need a latent UNet2DConditionModel or SD3Transformer2DModel pipeline, "
                     f"got {type(pipe).__name__}")


def _token_positions(pipe, kind: str, prompt: str, parts: Sequence[str]) -> dict[str, list[int]]:
    """Text positions of each part in the denoiser's text sequence (CLIP tokens; for SD3 also the
    T5 tokens when a T5 encoder is present, offset after the CLIP ones)."""
    tok = pipe.tokenizer
    out = {}
    for p in parts:
        pos = part_token_indices(tok, prompt, p, tok.model_max_length)
        if kind == "sd3" and getattr(pipe, "tokenizer_3", None) is not None and pipe.text_encoder_3 is not None:
            try:
                t5 = part_token_indices(pipe.tokenizer_3, prompt, p, 256, add_bos=False)
                pos += [tok.model_max_length + i for i in t5]
            except ValueError:
                pass
        out[p] = pos
    return out


def attention_maps(pipe, images: Tensor, prompt: str, parts: Sequence[str], *, timesteps: Sequence[float] = (0.5,),
                   resolution: int | None = None, seed: int = 0, batch_size: int = 4) -> Tensor:
    """Raw attention maps [C, P, H, W] of the part words of `prompt` on images [C, H, W, 3] in [0, 1].

    The images are resized to `resolution` (default: the denoiser's native size), encoded by the
    VAE, noised to each fraction t of the schedule in `timesteps` (DDPM-style for UNets, flow
    matching x_t = (1 - t) x_0 + t n for SD3) and denoised once with the prompt; the image-to-text
    attention of every layer is head-averaged, resized to the latent grid and averaged over layers,
    timesteps and the part's tokens, then resized to H x W.
    """
    kind = _pipeline_kind(pipe)
    parts = list(parts)
    positions = _token_positions(pipe, kind, prompt, parts)
    flat = sorted({i for v in positions.values() for i in v})
    model = pipe.unet if kind == "unet" else pipe.transformer
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    c, h, w = images.shape[:3]
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if resolution is None:
        resolution = model.config.sample_size * vae_factor
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if kind == "unet":
            embeds = pipe.encode_prompt(prompt, device, 1, False)[0]
            pooled = None
        else:
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, prompt_3=None, device=device,
                                                      num_images_per_prompt=1, do_classifier_free_guidance=False)
        x = images.permute(0, 3, 1, 2).to(device, torch.float32)
        x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True,
                                            align_corners=False)
        out = []
        for s in range(0, c, batch_size):
            xb = (x[s : s + batch_size] * 2 - 1).to(pipe.vae.dtype)
            lat = pipe.vae.encode(xb).latent_dist.mean
            shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
            lat = ((lat - shift) * pipe.vae.config.scaling_factor).to(dtype)
            lh, lw = lat.shape[-2:]
            acc = torch.zeros(lat.shape[0], len(flat), lh, lw, device=device)
            n_acc = 0
            for frac in timesteps:
                noise = torch.randn(lat.shape, generator=gen).to(device, dtype)
                with AttentionCapture(model, flat) as cap:
                    if kind == "unet":
                        n_train = pipe.scheduler.config.num_train_timesteps
                        step = int(round(frac * (n_train - 1)))
                        t = torch.full((lat.shape[0],), step, device=device, dtype=torch.long)
                        xt = pipe.scheduler.add_noise(lat, noise, t)
                        model(xt, t, encoder_hidden_states=embeds.expand(lat.shape[0], -1, -1))
                    else:
                        xt = (1 - frac) * lat + frac * noise
                        t = torch.full((lat.shape[0],), frac * pipe.scheduler.config.num_train_timesteps, device=device)
                        model(hidden_states=xt, timestep=t, encoder_hidden_states=embeds.expand(lat.shape[0], -1, -1),
                              pooled_projections=pooled.expand(lat.shape[0], -1))
                for m in cap.maps:  # [B, Nq, T]
                    f = math.sqrt(lh * lw / m.shape[1])
                    gh, gw = round(lh / f), round(lw / f)
                    if gh * gw != m.shape[1]:
                        continue
                    grid = m.transpose(1, 2).reshape(m.shape[0], len(flat), gh, gw)
                    acc += torch.nn.functional.interpolate(grid, size=(lh, lw), mode="bilinear", align_corners=False)
                    n_acc += 1
            if n_acc == 0:
                raise RuntimeError(f"no image-to-text attention was captured from {type(model).__name__}")
            acc /= n_acc
            per_part = torch.stack([acc[:, [flat.index(i) for i in positions[p]]].mean(dim=1) for p in parts], 1)
            out.append(torch.nn.functional.interpolate(per_part, size=(h, w), mode="bilinear", align_corners=False))
    return torch.cat(out).float().cpu()


def postprocess_attention(maps: Tensor, temperatures: float | Sequence[float] = 1.0, threshold: float = 0.5,
                          soft: bool = False) -> Tensor:
    """RoMaP-style post-processing of raw maps [C, P, H, W] into masks [C, P, H, W].

    Per view and part: min-max normalize, softmax over the pixels with the part's temperature,
    min-max normalize again; then pixels above `threshold` form the mask, and earlier-listed parts
    claim pixels first. With `soft`, the normalized maps (before thresholding and claiming) instead.
    """
    c, p = maps.shape[:2]
    temps = [temperatures] * p if np.isscalar(temperatures) else list(temperatures)
    temps = torch.as_tensor(temps, dtype=torch.float32)
    if temps.shape != (p,) or (temps <= 0).any():
        raise ValueError(f"temperatures must be positive, one per part ({p}), got {temperatures}")

    def norm(x):
        flat = x.flatten(2)
        lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
        return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(x)

    a = norm(maps.float())
    a = torch.softmax(a.flatten(2) / temps[None, :, None], dim=-1).view_as(a)
    a = norm(a)
    if soft:
        return a
    out = torch.zeros_like(a)
    free = torch.ones(c, *a.shape[2:], dtype=torch.bool)
    for i in range(p):
        take = (a[:, i] > threshold) & free
        out[:, i] = take.float()
        free &= ~take
    return out


def _load_pipeline(model, device=None):
    if not isinstance(model, (str, os.PathLike)):
        return model
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(model))
    return pipe.to(device) if device is not None else pipe


@MASK_SOURCES.register("attention")
def masks_from_attention(scene: GaussianScene, parts: Sequence[str], *, pipeline, prompt: str, cameras: Cameras,
                         temperatures: float | Sequence[float] = 1.0, threshold: float = 0.5,
                         timesteps: Sequence[float] = (0.5,), resolution: int | None = None, seed: int = 0,
                         background=(1.0, 1.0, 1.0), backend: str = "auto", device=None, **_) -> PartMasks:
    """The "attention" source: render the scene at `cameras`, take the part words' attention maps
    from `pipeline` (a loaded diffusers pipeline, a local folder or a hub id) with `prompt`, and
    post-process them (`postprocess_attention`)."""
    pipe = _load_pipeline(pipeline, device)
    images = render_views(scene, cameras, background=background, backend=backend)
    raw = attention_maps(pipe, images, prompt, parts, timesteps=timesteps, resolution=resolution, seed=seed)
    masks = postprocess_attention(raw, temperatures, threshold)
    return PartMasks(list(parts), masks, cameras, images)
