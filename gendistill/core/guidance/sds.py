"""Score distillation sampling (DreamFusion / threestudio) with DDPM-family UNets.

Epsilon-, v- and sample-prediction UNets, latent space (with a VAE) or pixel space
(`unet.in_channels == 3`, no VAE), text-conditioned (`UNet2DConditionModel`) or not
(`UNet2DModel`, e.g. a `DDPMPipeline`; then eps_hat = eps and prompts are ignored).

    x_t   = sqrt(a_t) x0 + sqrt(1 - a_t) noise                (DDPMScheduler.add_noise)
    eps_* = the UNet's prediction, converted to epsilon:  v -> sqrt(a_t) v + sqrt(1 - a_t) x_t
    eps_hat = eps_u + s (eps_c - eps_u)   ("standard")  or  eps_c + s (eps_c - eps_u)  ("threestudio")
    grad  = w(t) (eps_hat - noise)
"""

from __future__ import annotations

import inspect

import torch
from diffusers import DDPMScheduler

from gendistill.core.guidance.base import GUIDANCE, Guidance, cat_embeds, combine_cfg
from gendistill.core.guidance.schedule import sds_weight

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def has_beta_schedule(scheduler) -> bool:
    """True for DDPM-family schedulers (DDPM, DDIM, PNDM, Euler, DPM-Solver, ...)."""
    config = getattr(scheduler, "config", {})
    return "beta_start" in config and "beta_schedule" in config


def to_epsilon(pred: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """A UNet output [B,C,h,w] as an epsilon prediction; alpha_bar is [B]."""
    a = alpha_bar.view(-1, 1, 1, 1)
    if prediction_type == "epsilon":
        return pred
    if prediction_type == "v_prediction":
        return a.sqrt() * pred + (1 - a).sqrt() * x_t
    if prediction_type == "sample":
        return (x_t - a.sqrt() * pred) / (1 - a).sqrt()
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")


@GUIDANCE.register("sds")
class SDSGuidance(Guidance):
    """SDS with a UNet pipeline (SD 1.x / 2.x, v-prediction SD 2.x, pixel-space UNets)."""

    kind = "sds"
    attention_capture = "ours"  # image-to-text cross-attention of the UNet

    @classmethod
    def accepts(cls, pipe) -> bool:
        """A UNet with as many input as output channels and a DDPM-family scheduler."""
        unet = getattr(pipe, "unet", None)
        return (unet is not None and has_beta_schedule(getattr(pipe, "scheduler", None))
                and unet.config.in_channels == unet.config.out_channels and "InstructPix2Pix" not in type(pipe).__name__)

    @property
    def prediction(self) -> str:
        return {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[self.prediction_type]

    def __init__(self, pipe, **options):
        unet = getattr(pipe, "unet", None)
        if unet is None:
            raise ValueError(f"kind {self.kind!r} needs a pipeline with a UNet (`unet`), got {type(pipe).__name__}")
        if not has_beta_schedule(getattr(pipe, "scheduler", None)):
            raise ValueError(
                f"kind {self.kind!r} needs a DDPM-family scheduler (with beta_start / beta_schedule), got "
                f"{type(getattr(pipe, 'scheduler', None)).__name__}; flow-matching pipelines use kind 'rfds'"
            )
        self.denoiser = self.unet = unet
        super().__init__(pipe, **options)
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}; "
                             f"expected one of {', '.join(PREDICTION_TYPES)}")
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device, torch.float32)
        takes_text = "encoder_hidden_states" in inspect.signature(unet.forward).parameters
        self.conditional = takes_text and self.prompts is not None

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.out_channels)

    @property
    def latent_multiple(self) -> int:
        # UNet2DConditionModel upsamples to odd sizes itself; UNet2DModel needs exact halvings.
        if "encoder_hidden_states" in inspect.signature(self.unet.forward).parameters:
            return 1
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, t)

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, embeds: dict,
                    image_latents: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's epsilon prediction [B,C,h,w] (float32) at integer timesteps t [B].

        `image_latents` [B,C',h,w] are concatenated on channels (InstructPix2Pix).
        """
        x = x_t if image_latents is None else torch.cat([x_t, image_latents], dim=1)
        kwargs = {k: v.to(self.dtype) for k, v in embeds.items()} if self.conditional else {}
        pred = self.unet(x.to(self.dtype), t, **kwargs, return_dict=False)[0].float()
        return to_epsilon(pred, x_t, self.alphas_cumprod[t], self.prediction_type)

    def guided_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict, uncond: dict,
                   scale: float | None = None, cfg: str | None = None) -> torch.Tensor:
        """eps_hat with classifier-free guidance (cond and uncond in one batch of 2B)."""
        if not self.conditional:
            return self.predict_eps(x_t, t, {})
        both = self.predict_eps(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_embeds(cond, uncond))
        eps_c, eps_u = both.chunk(2)
        return combine_cfg(eps_c, eps_u, self.guidance_scale if scale is None else scale, cfg or self.cfg)

    def compute_grad(self, latents, t, noise, cond, uncond):
        x_t = self.add_noise(latents, noise, t)
        eps_hat = self.guided_eps(x_t, t, cond, uncond)
        w = sds_weight(self.alphas_cumprod[t], self.weighting)
        return w.view(-1, 1, 1, 1) * (eps_hat - noise), w
