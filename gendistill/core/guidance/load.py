"""`load_guidance`: a diffusers pipeline (hub id, local folder or object) as a score-distillation loss."""

from __future__ import annotations

import inspect
import os
from typing import Sequence

import torch

from gendistill.core.architectures import is_random, random_pipeline
from gendistill.core.runtime import as_dtype
from gendistill.registry import load_plugins
from gendistill.core.guidance.base import GUIDANCE, Guidance, check_cfg
from gendistill.core.guidance.ip2p import IP2PGuidance  # noqa: F401  (registers "ip2p")
from gendistill.core.guidance.rfds import RFDSGuidance  # noqa: F401  (registers "rfds")
from gendistill.core.guidance.schedule import check_t_range, check_weighting
from gendistill.core.guidance.sds import SDSGuidance  # noqa: F401  (registers "sds")

__all__ = ["CPU_OFFLOAD", "detect_kind", "load_pipeline", "load_guidance", "guidance_options"]

CPU_OFFLOAD = (None, "model", "sequential")


def option_names(cls) -> set[str]:
    """Keyword arguments accepted by a guidance class and its bases."""
    names = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass) and klass is not object:
            params = inspect.signature(klass.__init__).parameters.values()
            names |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return names - {"self"}


def guidance_options(kind: str = "auto") -> set[str]:
    """The `load_guidance` options (`**options`) of a kind; for "auto", those of every registered kind."""
    load_plugins()
    kinds = list(GUIDANCE.values()) if kind == "auto" else [GUIDANCE.get_entry(kind)]
    return set().union(*(option_names(cls) for cls in kinds)) - {"pipe", "guidance_scale", "weighting", "t_range", "cfg"}


def detect_kind(pipe) -> str:
    """The registered guidance kind that accepts `pipe` (`Guidance.accepts`): "rfds" for a flow-matching
    transformer, "ip2p" for InstructPix2Pix, "sds" for a DDPM-family UNet, or a plugin's. Kinds are
    asked latest registered first, so a plugin's kind wins over a built-in one that accepts the same."""
    load_plugins()
    for name, cls in reversed(GUIDANCE.items()):
        if cls.accepts(pipe):
            return name
    unet = getattr(pipe, "unet", None)
    raise ValueError(
        f"unsupported pipeline type {type(pipe).__name__} (denoiser "
        f"{type(unet or getattr(pipe, 'transformer', None)).__name__}, scheduler "
        f"{type(getattr(pipe, 'scheduler', None)).__name__}); expected a UNet pipeline with a DDPM-family scheduler "
        f"(SD 1.x/2.x, pixel-space UNets: kind 'sds'), an SD3-style flow-matching transformer pipeline "
        f"(kind 'rfds') or an InstructPix2Pix pipeline (kind 'ip2p')"
    )


def load_pipeline(
    model,
    *,
    dtype=None,
    device: str | torch.device | None = None,
    cpu_offload: str | None = None,
    attention_slicing: bool | str | int | None = None,
    vae_tiling: bool = False,
    **pipeline_kwargs,
):
    """A diffusers pipeline from a hub id, a local folder (works with HF_HUB_OFFLINE=1) or as given.

    Args:
        model: hub id, local folder, or a `DiffusionPipeline` (used as is; moved when asked);
            `random:<hub id>` builds it from `configs/models/` with random weights
            (`gendistill.core.architectures`).
        dtype: torch_dtype for loading ("float16", torch.float16, ...); a given pipeline is cast.
        device: where to run; default: the given pipeline's device, else "cuda" when available.
        cpu_offload: None, "model" (`enable_model_cpu_offload`) or "sequential".
        attention_slicing: True / "auto" / "max" / an int: `enable_attention_slicing`.
        vae_tiling: `vae.enable_tiling()`.
        pipeline_kwargs: passed to `DiffusionPipeline.from_pretrained` (e.g. variant="fp16",
            text_encoder_3=None, tokenizer_3=None to drop SD3's T5).
    """
    from diffusers import DiffusionPipeline

    dtype = as_dtype(dtype)
    if cpu_offload not in CPU_OFFLOAD:
        raise ValueError(f"unknown cpu_offload {cpu_offload!r}; expected None, 'model' or 'sequential'")
    if isinstance(model, DiffusionPipeline):
        pipe = model
        if dtype is not None:
            pipe.to(dtype=dtype)
    elif is_random(model):  # full size, random weights, built where it will run
        if device is None and cpu_offload is None and torch.cuda.is_available():
            device = "cuda"
        pipe = random_pipeline(model, dtype=dtype, device=device if cpu_offload is None else None,
                               **pipeline_kwargs)
    elif isinstance(model, (str, os.PathLike)):
        text = str(model)
        local = isinstance(model, os.PathLike) or text.startswith((".", "/", "~")) or text.count("/") > 1
        if local and not os.path.isdir(os.path.expanduser(text)):  # a hub id is "namespace/name"
            raise FileNotFoundError(f"model folder {text} does not exist (give a local folder written by "
                                    "save_pretrained, or a hub id like stabilityai/stable-diffusion-2-1-base)")
        kwargs = dict(pipeline_kwargs)
        try:
            index = DiffusionPipeline.load_config(model)
        except Exception as e:  # noqa: BLE001 - report where we looked
            raise OSError(f"could not read a diffusers pipeline (model_index.json) from {str(model)!r}: {e}") from e
        if "safety_checker" in index:  # a guidance never needs it; skip loading it
            kwargs.setdefault("safety_checker", None)
            kwargs.setdefault("requires_safety_checker", False)
        for name, entry in index.items():  # components saved as null (e.g. no VAE: a pixel-space UNet)
            if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is None and entry[1] is None:
                kwargs.setdefault(name, None)
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, **kwargs)
        if device is None and cpu_offload is None and torch.cuda.is_available():
            device = "cuda"
    else:
        raise TypeError(f"model must be a hub id, a local folder or a diffusers pipeline, got {type(model).__name__}")
    if cpu_offload == "model":
        pipe.enable_model_cpu_offload(device=device or "cuda")
    elif cpu_offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device or "cuda")
    elif device is not None:
        pipe.to(device)
    if attention_slicing:
        pipe.enable_attention_slicing("auto" if attention_slicing is True else attention_slicing)
    if vae_tiling:
        if getattr(pipe, "vae", None) is None or not hasattr(pipe.vae, "enable_tiling"):
            raise ValueError(f"vae_tiling: {type(pipe).__name__} has no VAE that supports tiling")
        pipe.vae.enable_tiling()
    return pipe


def load_guidance(
    model,
    kind: str = "auto",
    guidance_scale: float = 100.0,
    weighting: str = "sds",
    t_range: Sequence[float] = (0.02, 0.98),
    cfg: str = "standard",
    *,
    dtype=None,
    device: str | torch.device | None = None,
    cpu_offload: str | None = None,
    attention_slicing: bool | str | int | None = None,
    vae_tiling: bool = False,
    pipeline_kwargs: dict | None = None,
    **options,
) -> Guidance:
    """A score-distillation loss built from a diffusers pipeline.

    Args:
        model: hub id, local folder or loaded `DiffusionPipeline`.
        kind: "auto" (from the pipeline: flow-matching transformer -> "rfds", InstructPix2Pix ->
            "ip2p", DDPM-family UNet -> "sds"), "sds", "rfds" or "ip2p".
        guidance_scale: classifier-free guidance scale (text scale for "ip2p").
        weighting: "sds" (w = 1 - alpha_bar_t), "uniform" or "fantasia3d".
        t_range: (lo, hi) fractions of the training timesteps t is drawn from.
        cfg: "standard" or "threestudio" (see `Guidance`).
        dtype, device, cpu_offload, attention_slicing, vae_tiling, pipeline_kwargs: see `load_pipeline`.
        options: per kind: grad_clip, t_anneal ("none" | "linear" | "sqrt"), t_range_end,
            view_dependent, resolution, reduction ("sum" | "mean" | "masked_mean") (all kinds); image_guidance_scale (ip2p, 1.5);
            refine_noise (rfds, True).

    Returns:
        a `Guidance`; call `guidance.loss(images, prompt, ...)` and backpropagate.
    """
    unknown = sorted(set(options) - guidance_options(kind))  # before any loading; again below for "auto"
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)} for kind {kind!r}; known: "
                        f"{', '.join(sorted(guidance_options(kind)))}")
    check_weighting(weighting)
    check_cfg(cfg)
    check_t_range(t_range)
    pipe = load_pipeline(model, dtype=dtype, device=device, cpu_offload=cpu_offload,
                         attention_slicing=attention_slicing, vae_tiling=vae_tiling, **(pipeline_kwargs or {}))
    if kind == "auto":
        kind = detect_kind(pipe)
    cls = GUIDANCE.get_entry(kind)
    known = guidance_options(kind)
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)} for kind {kind!r}; known: {', '.join(sorted(known))}")
    return cls(pipe, guidance_scale=guidance_scale, weighting=weighting, t_range=t_range, cfg=cfg, **options)
