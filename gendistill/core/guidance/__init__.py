"""Score distillation with diffusers pipelines: SDS (eps / v UNets), RFDS (flow matching), IP2P.

    guidance = load_guidance("stabilityai/stable-diffusion-2-1-base", guidance_scale=100.0)
    loss = guidance.loss(images, "a DSLR photo of a corgi", azimuth=azi, elevation=ele)
    loss.backward()            # d loss / d latents = w(t) (eps_hat - noise) m / B
"""

from gendistill.core.guidance.base import CFG_FORMS, GUIDANCE, REDUCTIONS, Guidance, combine_cfg
from gendistill.core.guidance.ip2p import IP2PGuidance
from gendistill.core.guidance.load import detect_kind, load_guidance, load_pipeline
from gendistill.core.guidance.prompts import PromptCache, batch_prompts, view_suffix
from gendistill.core.guidance.rfds import RFDSGuidance
from gendistill.core.guidance.schedule import (
    ANNEALING,
    WEIGHTINGS,
    anneal_t_range,
    flow_alpha_bar,
    flow_sigmas,
    sample_timesteps,
    sds_weight,
    t_bounds,
)
from gendistill.core.guidance.sds import SDSGuidance, to_epsilon

__all__ = [
    "load_guidance",
    "load_pipeline",
    "detect_kind",
    "Guidance",
    "SDSGuidance",
    "RFDSGuidance",
    "IP2PGuidance",
    "GUIDANCE",
    "CFG_FORMS",
    "REDUCTIONS",
    "WEIGHTINGS",
    "ANNEALING",
    "combine_cfg",
    "to_epsilon",
    "sds_weight",
    "anneal_t_range",
    "sample_timesteps",
    "t_bounds",
    "flow_sigmas",
    "flow_alpha_bar",
    "view_suffix",
    "batch_prompts",
    "PromptCache",
]
