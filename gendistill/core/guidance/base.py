"""What every score-distillation guidance shares: inputs, VAE, timesteps, noise, mask, the loss.

A subclass supplies the denoiser call and `compute_grad(latents, t, noise, cond, uncond, **extra)
-> (grad [B,C,h,w], w [B])`. The loss is built with the target-detach trick,

    loss = 0.5 * || latents - (latents - grad).detach() ||^2 / B,

so that d loss / d latents = grad / B exactly, whatever produced `grad`.
"""

from __future__ import annotations

import functools

from typing import Sequence

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake
from diffusers.utils.torch_utils import randn_tensor

from gendistill.core.guidance.prompts import Embeds, PromptCache, batch_prompts, encoder_for
from gendistill.core.guidance.schedule import (
    ANNEALING,
    anneal_t_range,
    check_t_range,
    check_weighting,
    sample_timesteps,
)
from gendistill.registry import Registry

GUIDANCE = Registry("guidance kind")
CFG_FORMS = ("standard", "threestudio")
# how the per-element loss is reduced (d loss / d latents, with g = w(t) (prediction - target)):
# "sum": 0.5 sum(g^2 m) / B -> g m / B (DreamFusion / threestudio, soft area-averaged mask);
# "mean": the same divided by the C h w elements of one latent -> g m / (B C h w);
# "masked_mean": RoMaP's `F.mse_loss(...)[mask] / B`: the mean of g^2 over the masked latent elements
#   (hard mask: bilinear to the latent grid, > 0.5), / B -> 2 g m / (B n_masked)
REDUCTIONS = ("sum", "mean", "masked_mean")
RANGE_TOL = 1e-3


def combine_cfg(pred_c: torch.Tensor, pred_u: torch.Tensor, scale: float, cfg: str) -> torch.Tensor:
    """Classifier-free guidance: "standard" u + s (c - u); "threestudio" c + s (c - u)."""
    if cfg == "standard":
        return pred_u + scale * (pred_c - pred_u)
    if cfg == "threestudio":
        return pred_c + scale * (pred_c - pred_u)
    raise ValueError(f"unknown cfg form {cfg!r}; expected one of {', '.join(CFG_FORMS)}")


def check_cfg(cfg: str) -> str:
    if cfg not in CFG_FORMS:
        raise ValueError(f"unknown cfg form {cfg!r}; expected one of {', '.join(CFG_FORMS)}")
    return cfg


def _pair(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def cat_embeds(*embeds: Embeds) -> Embeds:
    return {k: torch.cat([e[k] for e in embeds]) for k in embeds[0]}


class Guidance:
    """A loaded diffusion model used as a loss. See `gendistill.core.guidance.load_guidance`.

    Args (shared by every kind):
        pipe: the diffusers pipeline (frozen and put in eval mode here).
        guidance_scale: classifier-free guidance scale s.
        weighting: w(t), "sds" (1 - alpha_bar_t), "uniform" (1) or "fantasia3d"
            (sqrt(alpha_bar_t) (1 - alpha_bar_t)).
        t_range: (lo, hi) fractions of the training timesteps that t is drawn from.
        cfg: "standard" (eps_u + s (eps_c - eps_u)) or "threestudio" (eps_c + s (eps_c - eps_u)).
        grad_clip: clamp every element of the gradient to [-grad_clip, grad_clip] (None: off).
        t_anneal: "none", "linear" or "sqrt": `set_step(step, max_steps)` moves the range
            from `t_range` to `t_range_end`.
        t_range_end: the range at the last step when annealing.
        view_dependent: append ", front view" etc. to the prompt when `loss` gets an azimuth.
        resolution: resize images (and masks, conditioning images) to this (H, W) before encoding;
            None keeps their size, which must then be a multiple of `size_multiple`.
        reduction: "sum", "mean" or "masked_mean" (RoMaP); see `REDUCTIONS`.
    """

    # what a kind declares, so that callers ask instead of testing names:
    kind = ""
    needs_image_condition = False  # `loss` also takes the conditioning image (InstructPix2Pix)
    anchor_method = "slamp"  # how the editor makes its 2D anchor edits: "slamp" or "ip2p" (the pipeline's own)
    attention_capture: str | None = None  # the part-mask capture its denoiser supports ("ours", "romap"), if any

    @classmethod
    def accepts(cls, pipe) -> bool:
        """Whether this kind can run `pipe` (`detect_kind` asks every registered kind)."""
        return False

    @property
    def prediction(self) -> str:
        """What the denoiser predicts: "eps", "v" or "flow"."""
        raise NotImplementedError

    def __init__(
        self,
        pipe,
        *,
        guidance_scale: float = 100.0,
        weighting: str = "sds",
        t_range: Sequence[float] = (0.02, 0.98),
        cfg: str = "standard",
        grad_clip: float | None = None,
        t_anneal: str = "none",
        t_range_end: Sequence[float] = (0.02, 0.50),
        view_dependent: bool = True,
        resolution: int | Sequence[int] | None = None,
        reduction: str = "sum",
    ):
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; expected one of {', '.join(REDUCTIONS)}")
        self.reduction = reduction
        self.pipe = pipe
        self.vae = getattr(pipe, "vae", None)
        self.guidance_scale = float(guidance_scale)
        self.weighting = check_weighting(weighting)
        self.cfg = check_cfg(cfg)
        self.t_range_start = check_t_range(t_range)
        self.t_range_end = check_t_range(t_range_end, "t_range_end")
        self.t_range = self.t_range_start
        if t_anneal not in ANNEALING:
            raise ValueError(f"unknown t_anneal {t_anneal!r}; expected one of {', '.join(ANNEALING)}")
        self.t_anneal = t_anneal
        if grad_clip is not None and float(grad_clip) <= 0:
            raise ValueError(f"grad_clip must be positive or None, got {grad_clip}")
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self.view_dependent = bool(view_dependent)
        self.resolution = _pair(resolution)
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval()
        encode = encoder_for(pipe, self.device)
        self.prompts = PromptCache(encode) if encode is not None else None
        self.last: dict = {}

    # --- what a subclass provides -------------------------------------------------------------
    denoiser: torch.nn.Module
    num_train_timesteps: int
    alphas_cumprod: torch.Tensor  # [N], for the weighting

    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels)

    @property
    def latent_multiple(self) -> int:
        """The latent height and width must be multiples of this."""
        return 1

    def compute_grad(self, latents, t, noise, cond, uncond, **extra) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # --- shared --------------------------------------------------------------------------------
    # read once: diffusers finds them by walking every module, which costs milliseconds a call
    @functools.cached_property
    def device(self) -> torch.device:
        """The pipeline's execution device (where offloading runs the models)."""
        return self.pipe._execution_device

    @functools.cached_property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @functools.cached_property
    def vae_dtype(self) -> torch.dtype:
        return self.vae.dtype

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this."""
        return self.vae_scale_factor * self.latent_multiple

    def set_step(self, step: int, max_steps: int) -> tuple[float, float]:
        """Anneal the timestep range for training step `step` of `max_steps`; returns the range."""
        self.t_range = anneal_t_range(step, max_steps, self.t_range_start, self.t_range_end, self.t_anneal)
        return self.t_range

    def embeddings(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str],
        batch: int,
        azimuth=None,
        elevation=None,
    ) -> tuple[Embeds, Embeds]:
        """(cond, uncond) embeddings with [B, ...] tensors; cached per prompt. Empty for no text."""
        if self.prompts is None:
            return {}, {}
        prompts = batch_prompts(prompt, batch, azimuth if self.view_dependent else None, elevation)
        negatives = batch_prompts(negative_prompt, batch)
        return self.prompts.get(prompts, negatives)

    def check_images(self, images: torch.Tensor, name: str = "images") -> torch.Tensor:
        """Validate [B,3,H,W] in [0,1], resize to `resolution`; returns float images on `device`."""
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise ValueError(f"{name} must be a float tensor [B,3,H,W] in [0,1], got {type(images).__name__}"
                             f"{'' if not isinstance(images, torch.Tensor) else ' of ' + str(images.dtype)}")
        if images.dim() != 4 or images.shape[1] != 3:
            hint = " (channels last? permute to [B,3,H,W])" if images.dim() == 4 and images.shape[-1] == 3 else ""
            raise ValueError(f"{name} must be [B,3,H,W], got shape {tuple(images.shape)}{hint}")
        lo, hi = (0.0, 1.0) if is_fake(images) else (float(v) for v in torch.aminmax(images.detach()))
        if lo < -RANGE_TOL or hi > 1 + RANGE_TOL:  # (fake tensors, in `gendistill plan`, have no values)
            raise ValueError(f"{name} must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]"
                             " (from [-1, 1] use (x + 1) / 2)")
        images = images.to(self.device)
        if self.resolution is not None and tuple(images.shape[-2:]) != self.resolution:
            images = F.interpolate(images, self.resolution, mode="bilinear", align_corners=False)
        k = self.size_multiple
        h, w = images.shape[-2:]
        if h % k or w % k:
            raise ValueError(f"{name} height and width must be multiples of {k} for this model, got {h}x{w}; "
                             f"resize them or pass resolution=(H, W) to load_guidance")
        return images

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None,
                      sample: bool = True) -> torch.Tensor:
        """[B,3,H,W] in [0,1] -> latents [B,C,H/f,W/f] float32, differentiable.

        With a VAE: (z - shift_factor) * scaling_factor, z drawn from the posterior (`sample`) or
        its mode. Without one (pixel-space models): 2 x - 1.
        """
        x = images * 2.0 - 1.0
        if self.vae is None:
            return x.float()
        posterior = self.vae.encode(x.to(self.vae_dtype)).latent_dist
        z = posterior.sample(generator=generator) if sample else posterior.mode()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((z.float() - shift) * self.vae.config.scaling_factor).float()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B,C,h,w] -> images [B,3,H,W] in [0,1] (float32)."""
        if self.vae is None:
            return ((latents.float() + 1.0) / 2.0).clamp(0, 1)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = latents.float() / self.vae.config.scaling_factor + shift
        images = self.vae.decode(z.to(self.vae_dtype)).sample.float()
        return ((images + 1.0) / 2.0).clamp(0, 1)

    def check_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point() or latents.dim() != 4:
            raise ValueError(f"latents must be a float tensor [B,{self.latent_channels},h,w], got "
                             f"{tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__}")
        if latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must have {self.latent_channels} channels for this model, "
                             f"got shape {tuple(latents.shape)}")
        k = self.latent_multiple
        if latents.shape[-2] % k or latents.shape[-1] % k:
            raise ValueError(f"latent height and width must be multiples of {k}, got {tuple(latents.shape[-2:])}")
        return latents.to(self.device)

    def timesteps(self, t, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B] int64 timesteps: `t` checked and broadcast, or drawn from the current range."""
        n = self.num_train_timesteps
        if t is None:
            return sample_timesteps(batch, self.t_range, n, generator=generator, device=self.device)
        t = torch.as_tensor(t, device=self.device)
        if t.is_floating_point():
            if not bool((t == t.round()).all()):
                raise ValueError(f"t must hold integer timesteps in [0, {n}), got {t.tolist()}")
        t = t.long().reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must be an int or a [B] = [{batch}] tensor, got shape {tuple(t.shape)}")
        if bool((t < 0).any() or (t >= n).any()):
            raise ValueError(f"t must hold integer timesteps in [0, {n}), got {t.tolist()}")
        return t

    def make_noise(self, noise, latents: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if noise is None:
            return randn_tensor(latents.shape, generator=generator, device=self.device, dtype=torch.float32)
        if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != tuple(latents.shape):
            raise ValueError(f"noise must have the latents' shape {tuple(latents.shape)}, got "
                             f"{tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__}")
        return noise.to(self.device, torch.float32)

    def latent_mask(self, mask, batch: int, latent_hw, image_hw=None, hard: bool | None = None) -> torch.Tensor | None:
        """[B|1,1,H,W] mask in [0,1] -> [B,1,h,w] on the latent grid: area-averaged, or with `hard`
        (default: reduction "masked_mean") bilinear then > 0.5, as RoMaP; None stays None.

        H, W may be the image size, the latent grid, or the latent grid times the VAE factor.
        """
        if mask is None:
            return None
        h, w = (int(v) for v in latent_hw)
        f = self.vae_scale_factor
        sizes = {(h, w), (h * f, w * f)} | ({tuple(int(v) for v in image_hw)} if image_hw is not None else set())
        ok_sizes = " or ".join(f"{a}x{b}" for a, b in sorted(sizes))
        if (not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[1] != 1
                or mask.shape[0] not in (1, batch) or tuple(mask.shape[-2:]) not in sizes):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            b = f"{batch} or 1" if batch != 1 else "1"
            raise ValueError(f"mask must be [B,1,H,W] in [0,1] (B = {b}, H x W = {ok_sizes}), got {got}")
        m = mask.to(self.device, torch.float32)
        if self.reduction == "masked_mean" if hard is None else hard:  # RoMaP: bilinear, then hard
            if tuple(m.shape[-2:]) != (h, w):
                m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
            m = (m > 0.5).float()
        elif tuple(m.shape[-2:]) != (h, w):
            m = F.interpolate(m, size=(h, w), mode="area")
        return m.expand(batch, 1, h, w)

    def loss(
        self,
        images: torch.Tensor | None = None,
        prompt: str | Sequence[str] = "",
        negative_prompt: str | Sequence[str] = "",
        *,
        latents: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        t=None,
        noise: torch.Tensor | None = None,
        azimuth=None,
        elevation=None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The score-distillation loss for one batch of views; backward gives grad / B.

        Args:
            images: [B,3,H,W] in [0,1] (encoded by the VAE, gradients flow through it), or
            latents: [B,C,h,w] given instead (the VAE is skipped).
            prompt / negative_prompt: one string or B strings.
            mask: [B|1,1,H,W] in [0,1]; the gradient is multiplied by it on the latent grid.
            t: int or [B] integer timesteps in [0, N); drawn from the current range when None.
            noise: [B,C,h,w] standard normal noise; drawn when None.
            azimuth, elevation: [B] camera angles in degrees for view-dependent prompts.
            generator: makes the drawn t, noise and VAE sample reproducible.

        Returns:
            [] loss with d loss / d latents = w(t) (prediction - target) m / B for reduction "sum" (see
            `REDUCTIONS` for the others); NaN / inf elements of the gradient are zeroed and counted in
            `self.last["nonfinite"]` (a caller skips such a step). `self.last` holds
            "t", "w", "grad" ([B,C,h,w], the gradient times B) and "latents" of this call.
        """
        return self._loss(images, prompt, negative_prompt, latents=latents, mask=mask, t=t, noise=noise,
                          azimuth=azimuth, elevation=elevation, generator=generator, extra={})

    def _loss(self, images, prompt, negative_prompt, *, latents, mask, t, noise, azimuth, elevation,
              generator, extra: dict) -> torch.Tensor:
        if (images is None) == (latents is None):
            raise ValueError("give either images [B,3,H,W] in [0,1] or latents [B,C,h,w] (exactly one)")
        image_hw = None
        if images is not None:
            image_hw = tuple(images.shape[-2:]) if isinstance(images, torch.Tensor) else None
            latents = self.encode_images(self.check_images(images), generator=generator)
        else:
            latents = self.check_latents(latents)
        batch = latents.shape[0]
        m = self.latent_mask(mask, batch, latents.shape[-2:], image_hw)
        t = self.timesteps(t, batch, generator)
        noise = self.make_noise(noise, latents, generator)
        cond, uncond = self.embeddings(prompt, negative_prompt, batch, azimuth, elevation)
        with torch.no_grad():
            grad, w = self.compute_grad(latents.detach().float(), t, noise, cond, uncond, **extra)
            finite = torch.isfinite(grad)
            nonfinite = 0 if is_fake(grad) else int((~finite).sum())
            if nonfinite:  # counted for the caller to skip the step (an fp16 overflow must not become a loss)
                grad = torch.where(finite, grad, torch.zeros_like(grad))
            if self.grad_clip is not None:
                grad = grad.clamp(-self.grad_clip, self.grad_clip)
            if m is not None:
                grad = grad * m
        target = (latents.float() - grad).detach()
        loss = self._reduce((latents.float() - target).pow(2), m, batch)
        self.last = {"t": t, "w": w, "grad": grad, "latents": latents.detach(), "nonfinite": nonfinite}
        return loss

    def _reduce(self, sq: torch.Tensor, m: torch.Tensor | None, batch: int) -> torch.Tensor:
        """sq [B,C,h,w] squared residual (already zero outside the mask) -> [] loss (see `REDUCTIONS`)."""
        if self.reduction == "sum":
            return 0.5 * sq.sum() / batch
        if self.reduction == "mean":
            return 0.5 * sq.sum() / (batch * sq[0].numel())
        if m is None:
            return sq.mean() / batch
        return sq.sum() / (m.sum() * sq.shape[1]).clamp_min(1) / batch  # every channel of a masked position

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(pipeline={type(self.pipe).__name__}, guidance_scale={self.guidance_scale}, "
                f"weighting={self.weighting!r}, cfg={self.cfg!r}, t_range={self.t_range})")
