"""InstructPix2Pix guidance: SDS with an image-conditioned UNet and three-way guidance.

The UNet sees [x_t, c] on channels, c the conditioning image's latents (the VAE posterior mode,
unscaled, as the pipeline's `prepare_image_latents`). With s_T = guidance_scale and
s_I = image_guidance_scale, as the pipeline (and threestudio's InstructPix2PixGuidance):

    eps_text  = eps(x_t, c, prompt)      eps_image = eps(x_t, c, negative)      eps_u = eps(x_t, 0, negative)
    eps_hat   = eps_u + s_T (eps_text - eps_image) + s_I (eps_image - eps_u)
    grad      = w(t) (eps_hat - noise)

Typical settings (threestudio): guidance_scale=7.5, image_guidance_scale=1.5.
"""

from __future__ import annotations

import torch

from gendistill.core.guidance.base import GUIDANCE, cat_embeds
from gendistill.core.guidance.schedule import sds_weight
from gendistill.core.guidance.sds import SDSGuidance, has_beta_schedule


@GUIDANCE.register("ip2p")
class IP2PGuidance(SDSGuidance):
    """InstructPix2Pix as a loss; `loss` also takes the conditioning image (the original view)."""

    kind = "ip2p"
    needs_image_condition = True
    anchor_method = "ip2p"
    attention_capture = None  # its UNet also takes the condition image: no plain text-to-image attention

    @classmethod
    def accepts(cls, pipe) -> bool:
        """An InstructPix2Pix pipeline: a latent UNet taking the noisy and the condition latents."""
        unet = getattr(pipe, "unet", None)
        return (unet is not None and has_beta_schedule(getattr(pipe, "scheduler", None))
                and ("InstructPix2Pix" in type(pipe).__name__
                     or (getattr(pipe, "vae", None) is not None and unet.config.in_channels == 2 * unet.config.out_channels)))

    def __init__(self, pipe, *, image_guidance_scale: float = 1.5, **options):
        super().__init__(pipe, **options)
        if self.cfg != "standard":
            raise ValueError(f"kind 'ip2p' uses InstructPix2Pix's three-way guidance; cfg must be 'standard', "
                             f"got {self.cfg!r}")
        if self.vae is None or self.unet.config.in_channels != 2 * self.unet.config.out_channels:
            raise ValueError(
                f"kind 'ip2p' needs a VAE and a UNet whose input has twice its output channels (latents + "
                f"image latents), got in_channels={self.unet.config.in_channels}, "
                f"out_channels={self.unet.config.out_channels}"
            )
        self.image_guidance_scale = float(image_guidance_scale)

    def encode_condition(self, image_cond: torch.Tensor) -> torch.Tensor:
        """Conditioning images [B,3,H,W] in [0,1] -> unscaled posterior-mode latents [B,C,h,w]."""
        images = self.check_images(image_cond, "image_cond")
        with torch.no_grad():
            z = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist.mode()
        return z.float()

    def loss(self, images=None, prompt="", negative_prompt="", *, latents=None, mask=None, t=None,
             noise=None, azimuth=None, elevation=None, generator=None, image_cond=None,
             image_cond_latents=None) -> torch.Tensor:
        """As `Guidance.loss`, plus the conditioning image: `image_cond` [B|1,3,H,W] in [0,1]
        (same size as `images`) or its latents `image_cond_latents` [B|1,C,h,w] (`encode_condition`)."""
        if (image_cond is None) == (image_cond_latents is None):
            raise ValueError("kind 'ip2p' needs the conditioning image: give image_cond [B,3,H,W] in [0,1] "
                             "or image_cond_latents (exactly one)")
        if image_cond is not None:
            image_cond_latents = self.encode_condition(image_cond)
        return self._loss(images, prompt, negative_prompt, latents=latents, mask=mask, t=t, noise=noise,
                          azimuth=azimuth, elevation=elevation, generator=generator,
                          extra={"image_latents": image_cond_latents.to(self.device, torch.float32)})

    def compute_grad(self, latents, t, noise, cond, uncond, image_latents):
        batch = latents.shape[0]
        if image_latents.shape[0] == 1:
            image_latents = image_latents.expand(batch, -1, -1, -1)
        if image_latents.shape[0] != batch or image_latents.shape[-2:] != latents.shape[-2:]:
            raise ValueError(f"the conditioning image's latents {tuple(image_latents.shape)} do not match the "
                             f"latents {tuple(latents.shape)}: give image_cond at the images' size")
        x_t = self.add_noise(latents, noise, t)
        eps = self.predict_eps(
            torch.cat([x_t] * 3),
            torch.cat([t] * 3),
            cat_embeds(cond, uncond, uncond),
            image_latents=torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)]),
        )
        eps_text, eps_image, eps_u = eps.chunk(3)
        eps_hat = (eps_u + self.guidance_scale * (eps_text - eps_image)
                   + self.image_guidance_scale * (eps_image - eps_u))
        w = sds_weight(self.alphas_cumprod[t], self.weighting)
        return w.view(-1, 1, 1, 1) * (eps_hat - noise), w
