"""SLaMP (RoMaP): scheduled latent mixing and part editing of one rendered view.

1. Encode the view (VAE posterior mode) to z_0 and invert it towards noise, keeping the whole
   trajectory z_orig[k]: RF inversion (Rout et al., controlled forward ODE) for flow models,
   DDIM inversion for epsilon / v models.
2. Run the editing pass from the inverted noise with the edit prompt (classifier-free
   guidance), and after every step k mix with the original trajectory outside the part:

       z <- z (1 - M_inv) + z_orig[k] M_inv,    M_inv = F (1 - M),
       F = alpha_base for the first steps, alpha_last for the last t_s steps,

   M the part mask on the latent grid (1 = edit). With alpha_last = 1 the final latents equal
   z_0 wherever M = 0.

The controllers, for both model families (exact for gamma = 1 / eta = 1):
- inversion (gamma): the model's prediction is pulled towards the straight path to a drawn
  noise y1: flow v <- v + gamma ((y1 - z) / (1 - sigma) - v); epsilon eps <- eps + gamma (y1 - eps).
- editing (eta, first `eta_stop` fraction of the steps): pulled towards the path back to z_0:
  flow v <- v + eta ((z - z_0) / sigma - v); epsilon eps <- eps + eta ((z - sqrt(a) z_0) / sqrt(1 - a) - eps).

The paper publishes no values; the defaults below are ours: 28 steps (SD3's default), RF-Inversion's
published gamma = 0.5 (also RoMaP's released inversion) and eta = 0.9 for the first quarter,
alpha_base = 0.8 (the background may still blend at the seam early), alpha_last = 1 for the
last t_s = 7 steps (the background comes back exactly), guidance scale 7.0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

from gendistill.core.guidance import Guidance, RFDSGuidance, SDSGuidance


@dataclass
class SLaMPConfig:
    """SLaMP settings (our defaults; the paper publishes none).

    num_steps: inversion steps = editing steps.
    guidance_scale: classifier-free guidance of the editing pass.
    gamma: inversion controller strength in [0, 1] (0: plain RF / DDIM inversion).
    eta: editing controller strength in [0, 1] towards the original (0: off).
    eta_stop: fraction of the editing steps, from the start, where eta applies.
    alpha_base: mixing weight F before the last t_s steps.
    alpha_last: mixing weight F for the last t_s steps (1: background restored exactly).
    t_s: number of last steps that use alpha_last.
    source_prompt: prompt the inversion is conditioned on ("" = unconditional).
    """

    num_steps: int = 28
    guidance_scale: float = 7.0
    gamma: float = 0.5
    eta: float = 0.9
    eta_stop: float = 0.25
    alpha_base: float = 0.8
    alpha_last: float = 1.0
    t_s: int = 7
    source_prompt: str = ""

    def __post_init__(self):
        if int(self.num_steps) < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if not 0 <= int(self.t_s) <= int(self.num_steps):
            raise ValueError(f"t_s must be in [0, num_steps={self.num_steps}], got {self.t_s}")
        for name in ("gamma", "eta", "eta_stop", "alpha_base", "alpha_last"):
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")


@dataclass
class SLaMPResult:
    images: torch.Tensor  # [B,3,H,W] in [0,1], the edited view
    latents: torch.Tensor  # [B,C,h,w] edited latents
    original_latents: torch.Tensor  # [B,C,h,w] z_0 of the input view
    inverted: torch.Tensor  # [B,C,h,w] the end of the inversion (noise)


def mixing_weight(step: int, num_steps: int, alpha_base: float, alpha_last: float, t_s: int) -> float:
    """F for editing step `step` (0-based): alpha_last for the last t_s steps, else alpha_base."""
    return alpha_last if step >= num_steps - t_s else alpha_base


def mix_latents(z: torch.Tensor, z_orig: torch.Tensor, mask: torch.Tensor, weight: float) -> torch.Tensor:
    """z (1 - M_inv) + z_orig M_inv with M_inv = weight (1 - mask); mask [B,1,h,w], 1 = edit."""
    m_inv = weight * (1.0 - mask)
    return z * (1.0 - m_inv) + z_orig * m_inv


def flow_levels(guidance: RFDSGuidance, num_steps: int) -> torch.Tensor:
    """[K+1] noise levels from 0 to 1, uniform then shifted as the scheduler's (static) shift."""
    s = torch.linspace(0.0, 1.0, num_steps + 1, device=guidance.device)
    shift = float(guidance.pipe.scheduler.config.get("shift", 1.0) or 1.0)
    return shift * s / (1.0 + (shift - 1.0) * s)


def ddim_levels(guidance: SDSGuidance, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([K] ascending integer timesteps ending at N-1, [K+1] alpha_bar with alpha_bar = 1 first)."""
    n = guidance.num_train_timesteps
    t = torch.linspace(0, n - 1, num_steps + 1, device=guidance.device).round().long()[1:]
    a = torch.cat([torch.ones(1, device=guidance.device), guidance.alphas_cumprod[t]])
    return t, a


def rf_invert(guidance: RFDSGuidance, z0, src, sigmas, gamma: float, y1) -> list[torch.Tensor]:
    """Controlled forward Euler ODE z(sigma_0 = 0) -> z(sigma_K = 1); returns all K+1 states."""
    traj, z = [z0], z0
    batch = z0.shape[0]
    for k in range(len(sigmas) - 1):
        sigma = sigmas[k].expand(batch)
        v = guidance.predict_velocity(z, sigma, src)
        v = v + gamma * ((y1 - z) / (1.0 - sigmas[k]) - v)
        z = z + v * (sigmas[k + 1] - sigmas[k])
        traj.append(z)
    return traj


def ddim_invert(guidance: SDSGuidance, z0, src, timesteps, alphas, gamma: float, y1) -> list[torch.Tensor]:
    """Controlled DDIM inversion from alpha_bar = 1 to timesteps[-1]; returns all K+1 states.

    Step k evaluates the model at the target timestep (as diffusers' DDIMInverseScheduler).
    """
    traj, z = [z0], z0
    batch = z0.shape[0]
    for k in range(len(timesteps)):
        eps = guidance.predict_eps(z, timesteps[k].expand(batch), src)
        eps = eps + gamma * (y1 - eps)
        x0 = (z - (1 - alphas[k]).sqrt() * eps) / alphas[k].sqrt()
        z = alphas[k + 1].sqrt() * x0 + (1 - alphas[k + 1]).sqrt() * eps
        traj.append(z)
    return traj


@torch.no_grad()
def slamp_edit(
    guidance: Guidance,
    images: torch.Tensor,
    mask: torch.Tensor,
    prompt: str,
    negative_prompt: str = "",
    config: SLaMPConfig | None = None,
    *,
    azimuth=None,
    elevation=None,
    generator: torch.Generator | None = None,
) -> SLaMPResult:
    """Edit the part `mask` of rendered views with `prompt`, keeping the rest.

    Args:
        guidance: a loaded "sds" (epsilon / v UNet) or "rfds" (flow transformer) guidance.
        images: [B,3,H,W] in [0,1].
        mask: [B|1,1,H,W] in [0,1], 1 on the part to edit (resized to the latent grid).
        prompt, negative_prompt: the edit prompt (view suffix added when azimuth is given).
        config: `SLaMPConfig`.
        generator: the inversion's target noise y1.

    Returns:
        `SLaMPResult` with the edited images [B,3,H,W] and latents.
    """
    config = config or SLaMPConfig()
    if not isinstance(guidance, (RFDSGuidance, SDSGuidance)) or guidance.needs_image_condition:
        raise ValueError(f"SLaMP needs a text-to-image guidance of kind 'sds' or 'rfds', got "
                         f"{getattr(guidance, 'kind', type(guidance).__name__)!r}")
    images = guidance.check_images(images)
    z0 = guidance.encode_images(images, sample=False)
    batch, k = z0.shape[0], int(config.num_steps)
    m = guidance.latent_mask(mask, batch, z0.shape[-2:], images.shape[-2:], hard=False)  # soft blending
    cond, uncond = guidance.embeddings(prompt, negative_prompt, batch, azimuth, elevation)
    src, _ = guidance.embeddings(config.source_prompt, negative_prompt, batch)
    y1 = randn_tensor(z0.shape, generator=generator, device=guidance.device, dtype=torch.float32)
    flow = isinstance(guidance, RFDSGuidance)

    if flow:
        sigmas = flow_levels(guidance, k)
        traj = rf_invert(guidance, z0, src, sigmas, float(config.gamma), y1)
    else:
        timesteps, alphas = ddim_levels(guidance, k)
        traj = ddim_invert(guidance, z0, src, timesteps, alphas, float(config.gamma), y1)

    z = traj[-1]
    for i in range(k):
        level = k - i  # z is at level `level`, this step goes to level - 1
        eta = float(config.eta) if i < config.eta_stop * k else 0.0
        if flow:
            sigma = sigmas[level]
            v = guidance.guided_velocity(z, sigma.expand(batch), cond, uncond, config.guidance_scale, "standard")
            if eta:
                v = v + eta * ((z - z0) / sigma - v)
            z = z + v * (sigmas[level - 1] - sigma)
        else:
            a, a_prev = alphas[level], alphas[level - 1]
            eps = guidance.guided_eps(z, timesteps[level - 1].expand(batch), cond, uncond,
                                      config.guidance_scale, "standard")
            if eta:
                eps = eps + eta * ((z - a.sqrt() * z0) / (1 - a).sqrt() - eps)
            x0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
            z = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        if m is not None:
            weight = mixing_weight(i, k, float(config.alpha_base), float(config.alpha_last), int(config.t_s))
            z = mix_latents(z, traj[level - 1], m, weight)
    return SLaMPResult(images=guidance.decode_latents(z), latents=z, original_latents=z0, inverted=traj[-1])
