"""RoMaP's attention capture for SD3-style pipelines (joint-attention transformer, rectified flow).

As the released code (janeyeon/RoMaP-code, `threestudio/models/guidance/romap_guidance_sd3.py`):

- **Scores**: pre-softmax text-query -> image-key logits q_txt . k_img / sqrt(d) (`SDPA.forward`
  :183, read by `hook_fn` :351 as `attn_weight[:, :, 1024 + token, :1024]`), averaged over heads
  and over a part's tokens (:352), summed over transformer blocks 0 .. n-2 (`block_list =
  range(0, 23)` of SD3-medium's 24, :315, :343), at CLIP token positions (the token indices count
  words of the CLIP prompt, `romap.py` :229-241; the T5 tokens follow the 77 CLIP ones).
- **When**: the 4th model call of a 5-step controlled inversion (`compute_exact_inversion`
  :639-700): from the clean latent x_0, with one noise draw y_1 and the model's velocity v_k
  (conditional prompt), x_{k+1} = x_k + (v_k + gamma ((y_1 - x_k) / (1 - sigma_k) - v_k))
  (sigma_{k+1} - sigma_k), gamma 0.5, sigmas ascending from the training schedule at indices
  range(lo, hi + 1, (hi - lo) // 5), [lo, hi] = 1000 x (0.3, 0.98) (`romap-*.yaml`
  min/max_step_percent); the maps kept are those of the call at sigma_3 (the loop breaks at
  t == 3, and each call first resets the maps, :680, :699).
- **Input**: a VAE *sample* (`encode_images` :582), 512 px renders (the hook's 32 x 32 grid) on
  a black background (`romap.py` :799).

`refiner` resolves the post-processing refiner option (RoMaP uses CascadePSP, `romap.py` :1124).
"""

from __future__ import annotations

import importlib
import re
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["TextImageScores", "text_image_scores", "inversion_schedule", "controlled_inversion",
           "romap_attention_maps", "refiner", "cascadepsp_refiner"]

_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.attn\.processor$")


def text_image_scores(attn, hidden_states: Tensor, encoder_hidden_states: Tensor, rows: Sequence[int]) -> Tensor:
    """Head-averaged pre-softmax scores [B, R, N] of text positions `rows` (queries) against the N
    image tokens (keys) of one joint-attention call: hidden_states [B, N, D], encoder_hidden_states
    [B, T, D'] (the norms of the model's processor, if any, applied as it does)."""
    b, heads = hidden_states.shape[0], attn.heads
    k = attn.to_k(hidden_states)
    q = attn.add_q_proj(encoder_hidden_states[:, list(rows)])  # a per-token projection: rows first
    d = k.shape[-1] // heads
    k = k.view(b, -1, heads, d).transpose(1, 2)
    q = q.view(b, -1, heads, d).transpose(1, 2)
    if getattr(attn, "norm_k", None) is not None:
        k = attn.norm_k(k)
    if getattr(attn, "norm_added_q", None) is not None:
        q = attn.norm_added_q(q)
    scale = attn.scale if getattr(attn, "scale", None) else d ** -0.5
    return ((q.float() @ k.float().transpose(-1, -2)) * scale).mean(dim=1)


class TextImageScores:
    """Context manager: wraps the joint-attention processors of `transformer` (an
    SD3Transformer2DModel) so that every call of blocks `blocks` (default: all but the last; block
    0 for a one-block model) adds
    its `text_image_scores` of the text positions `rows` to `total` [B, R, N]. `reset()` clears it
    (call it before each model call); `seen` lists the blocks added since. Restores the
    processors on exit; the model's outputs are unchanged."""

    def __init__(self, transformer, rows: Sequence[int], blocks: Sequence[int] | None = None):
        self.transformer, self.rows = transformer, list(rows)
        names = dict(transformer.attn_processors)
        self.block_of = {n: int(m.group(1)) for n in names if (m := _BLOCK.search(n))}
        if not self.block_of:
            raise ValueError(f"{type(transformer).__name__} has no transformer_blocks.<i>.attn processors; "
                             "capture='romap' needs an SD3-style joint-attention transformer")
        n_blocks = max(self.block_of.values()) + 1
        self.blocks = set(range(max(1, n_blocks - 1))) if blocks is None else {int(b) for b in blocks}
        bad = sorted(b for b in self.blocks if not 0 <= b < n_blocks)
        if bad or not self.blocks:
            raise ValueError(f"blocks must be one or more block indices in 0..{n_blocks - 1}, "
                             f"got {sorted(self.blocks)}")
        self.total: Tensor | None = None
        self.seen: list[int] = []
        self._saved = None

    def reset(self) -> None:
        self.total, self.seen = None, []

    def __enter__(self) -> "TextImageScores":
        self._saved = dict(self.transformer.attn_processors)
        self.transformer.set_attn_processor(
            {n: _ScoreProcessor(p, self, self.block_of.get(n)) for n, p in self._saved.items()})
        return self

    def __exit__(self, *exc) -> None:
        self.transformer.set_attn_processor(self._saved)

    def add(self, block: int, attn, hidden_states: Tensor, encoder_hidden_states: Tensor) -> None:
        s = text_image_scores(attn, hidden_states, encoder_hidden_states, self.rows).detach()
        self.total = s if self.total is None else self.total + s
        self.seen.append(block)


class _ScoreProcessor:
    """Adds a block's scores to a `TextImageScores`, then defers to the wrapped processor."""

    def __init__(self, inner, capture: TextImageScores, block: int | None):
        self.inner, self.capture, self.block = inner, capture, block

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if encoder_hidden_states is not None and self.block in self.capture.blocks:
            self.capture.add(self.block, attn, hidden_states, encoder_hidden_states)
        return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


def inversion_schedule(scheduler, t_range: Sequence[float] = (0.3, 0.98), steps: int = 5) -> tuple[Tensor, Tensor]:
    """(timesteps, sigmas), ascending in noise, of RoMaP's inversion: the flow-matching training
    schedule of `scheduler`'s config (as built, before any set_timesteps) at indices
    range(lo, hi + 1, (hi - lo) // steps), lo, hi = int(num_train_timesteps * t_range)."""
    lo_f, hi_f = (float(t) for t in t_range)
    if not 0 <= lo_f < hi_f <= 1:
        raise ValueError(f"t_range must be (lo, hi) with 0 <= lo < hi <= 1, got {tuple(t_range)}")
    fresh = type(scheduler).from_config(scheduler.config)
    if not hasattr(fresh, "sigmas") or len(fresh.sigmas) != len(fresh.timesteps):
        raise ValueError(f"capture='romap' needs a flow-matching scheduler with one sigma per training timestep, "
                         f"got {type(scheduler).__name__}")
    n = fresh.config.num_train_timesteps
    lo, hi = int(n * lo_f), int(n * hi_f)
    stride = (hi - lo) // steps
    if stride < 1:
        raise ValueError(f"t_range {tuple(t_range)} is too narrow for {steps} inversion steps")
    idx = torch.arange(lo, min(hi, n - 1) + 1, stride)
    ts, sig = fresh.timesteps[idx].float(), fresh.sigmas[idx].float()
    order = torch.argsort(ts)
    return ts[order], sig[order]


def controlled_inversion(velocity: Callable[[Tensor, Tensor], Tensor], x0: Tensor, noise: Tensor, timesteps: Tensor,
                         sigmas: Tensor, *, gamma: float = 0.5, calls: int = 4) -> Tensor:
    """Run RoMaP's controlled inversion from x0 [B, ...] towards `noise` [B, ...] for `calls` model
    calls `velocity(x, t)` at timesteps[0 .. calls-1]; x_{k+1} = x_k + (v_k + gamma ((noise - x_k)
    / (1 - sigma_k) - v_k)) (sigma_{k+1} - sigma_k). Returns the input of the last call."""
    if not 1 <= calls <= len(sigmas):
        raise ValueError(f"capture_step must be in 1..{len(sigmas)} (the schedule has {len(sigmas)} timesteps), "
                         f"got {calls}")
    x = x0
    for k in range(calls):
        v = velocity(x, timesteps[k])
        if k == calls - 1:
            break
        target = (noise - x) / (1 - sigmas[k])
        x = x + (v + gamma * (target - v)) * (sigmas[k + 1] - sigmas[k])
    return x


def _max_resolution(pipe) -> int | None:
    cfg = pipe.transformer.config
    size = getattr(cfg, "pos_embed_max_size", None)
    return None if size is None else size * cfg.patch_size * (2 ** (len(pipe.vae.config.block_out_channels) - 1))


def _check_resolution(pipe, resolution: int | None) -> int:
    """512 (RoMaP) or the given size, within the transformer's position table."""
    top = _max_resolution(pipe)
    if resolution is None:
        return 512 if top is None else min(512, top)
    unit = pipe.transformer.config.patch_size * (2 ** (len(pipe.vae.config.block_out_channels) - 1))
    if resolution % unit or (top is not None and resolution > top):
        raise ValueError(f"resolution {resolution} must be a multiple of {unit}"
                         + (f" and at most {top} (the transformer's position table)" if top else ""))
    return int(resolution)


def romap_attention_maps(pipe, images: Tensor, prompt: str, groups: Sequence[Sequence[int]], *,
                         resolution: int | None = None, t_range: Sequence[float] = (0.3, 0.98),
                         inversion_steps: int = 5, capture_step: int = 4, gamma: float = 0.5,
                         blocks: Sequence[int] | None = None, seed: int = 0, batch_size: int = 4) -> Tensor:
    """RoMaP's raw attention maps [C, G, h, w] on the transformer's patch grid (h x w = the
    latent / patch size) of token groups `groups` (CLIP positions, one list per part) for images
    [C, H, W, 3] in [0, 1], resized to `resolution` (default 512, or the largest the position
    table allows). Per batch of views, a torch.Generator seeded with `seed` draws the VAE sample,
    then the inversion noise."""
    from gendistill.core.guidance.prompts import encoder_for

    model, vae = pipe.transformer, pipe.vae
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    resolution = _check_resolution(pipe, resolution)
    ts, sig = inversion_schedule(pipe.scheduler, t_range, inversion_steps)
    if not 1 <= capture_step <= inversion_steps:
        raise ValueError(f"capture_step must be in 1..inversion_steps ({inversion_steps}), got {capture_step}")
    cond = encoder_for(pipe, device)(prompt, "")[0]
    rows = sorted({i for g in groups for i in g})
    where = [[rows.index(i) for i in g] for g in groups]
    x = images.permute(0, 3, 1, 2).to(device, torch.float32).clamp(0, 1)
    x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True,
                                        align_corners=False)
    gen = torch.Generator().manual_seed(seed)
    patch = model.config.patch_size
    out = []
    with torch.no_grad(), TextImageScores(model, rows, blocks) as cap:
        for s in range(0, len(x), batch_size):
            dist = vae.encode((x[s : s + batch_size] * 2 - 1).to(vae.dtype)).latent_dist
            lat = dist.sample(generator=gen)
            lat = ((lat - (getattr(vae.config, "shift_factor", None) or 0.0)) * vae.config.scaling_factor).float()
            noise = torch.randn(lat.shape, generator=gen).to(device)  # the update runs in float32, as RoMaP's
            b = lat.shape[0]
            embeds = {k: v.expand(b, *v.shape[1:]).to(dtype) for k, v in cond.items()}

            def velocity(xt: Tensor, t: Tensor) -> Tensor:
                cap.reset()
                tt = torch.full((b,), float(t), device=device, dtype=dtype)
                return model(hidden_states=xt.to(dtype), timestep=tt, return_dict=False, **embeds)[0].float()

            controlled_inversion(velocity, lat, noise, ts.to(device), sig.to(device), gamma=gamma, calls=capture_step)
            if cap.total is None:
                raise RuntimeError(f"no text-to-image attention was captured from {type(model).__name__}")
            h, w = lat.shape[-2] // patch, lat.shape[-1] // patch
            maps = torch.stack([cap.total[:, i].mean(dim=1) for i in where], dim=1)  # [b, G, N]
            out.append(maps.reshape(b, len(groups), h, w).float().cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------- refiners
def cascadepsp_refiner(device: str | None = None, fast: bool = False,
                       L: int = 900) -> Callable[[Tensor, Tensor], Tensor]:
    """A `refine(image [3, H, W] in [0, 1], mask [H, W] in [0, 1]) -> mask [H, W]` from CascadePSP
    (`pip install segmentation-refinement`), called as RoMaP does (uint8 image, mask x 255,
    fast=False, L=900; `romap.py` :1124-1128)."""
    try:
        import segmentation_refinement
    except ImportError:
        raise ImportError("refine='cascadepsp' needs CascadePSP: pip install segmentation-refinement") from None
    from gendistill.core.runtime import resolve_device

    model = segmentation_refinement.Refiner(device=str(resolve_device(device)))

    def refine(image: Tensor, mask: Tensor) -> Tensor:
        img = (image.clamp(0, 1) * 255).permute(1, 2, 0).to(torch.uint8).cpu().numpy()
        got = model.refine(img, (mask.float() * 255).cpu().numpy(), fast=fast, L=L)
        return torch.as_tensor(got, dtype=torch.float32)

    return refine


def refiner(spec) -> Callable[[Tensor, Tensor], Tensor] | None:
    """The `refine` option as a callable: None, a callable, "cascadepsp" (`cascadepsp_refiner()`)
    or "module:function" (an importable `refine(image [3, H, W], mask [H, W]) -> mask [H, W]`)."""
    if spec is None or callable(spec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"refine must be None, a callable, 'cascadepsp' or 'module:function', "
                        f"got {type(spec).__name__}")
    if spec == "cascadepsp":
        return cascadepsp_refiner()
    mod, _, name = spec.partition(":")
    if not mod or not name:
        raise ValueError(f"refine: {spec!r} is not 'cascadepsp' or 'module:function'")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"refine: cannot import {spec!r}: {err}") from None
    if not callable(fn):
        raise ValueError(f"refine: {spec!r} is not callable")
    return fn
