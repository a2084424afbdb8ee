"""Prompt handling: view-dependent suffixes and a cache of text embeddings per prompt.

Embeddings are kept as dicts of keyword arguments for the denoiser (for a UNet
`{"encoder_hidden_states": [1, L, D]}`, for SD3 also `"pooled_projections": [1, P]`), made by
the pipeline's own `encode_prompt` so they match what the pipeline would feed its model.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["Embeds", "view_suffix", "batch_prompts", "PromptCache", "encoder_for"]

Embeds = dict  # name -> [B, ...] tensor, passed to the denoiser as keyword arguments


def view_suffix(
    azimuth: float,
    elevation: float,
    *,
    front_threshold: float = 45.0,
    back_threshold: float = 45.0,
    overhead_threshold: float = 60.0,
) -> str:
    """", front view" / ", side view" / ", back view" / ", overhead view" for one camera.

    Angles in degrees; azimuth 0 looks at the object's front (DreamFusion / threestudio).
    The rules, later ones winning: side by default; front when the azimuth, wrapped to
    [-180, 180), lies within `front_threshold` of 0; back when within `back_threshold` of 180;
    overhead when the elevation exceeds `overhead_threshold`.
    """
    azi = (float(azimuth) + 180.0) % 360.0 - 180.0
    view = "side"
    if -front_threshold < azi < front_threshold:
        view = "front"
    if azi > 180.0 - back_threshold or azi < -180.0 + back_threshold:
        view = "back"
    if float(elevation) > overhead_threshold:
        view = "overhead"
    return f", {view} view"


def batch_prompts(
    prompt: str | Sequence[str],
    batch: int,
    azimuth: torch.Tensor | Sequence[float] | None = None,
    elevation: torch.Tensor | Sequence[float] | None = None,
    **thresholds,
) -> list[str]:
    """One prompt per sample, with a view suffix when `azimuth` ([B] degrees) is given."""
    prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
    if len(prompts) != batch:
        raise ValueError(f"got {len(prompts)} prompts for a batch of {batch}; give one string or {batch}")
    if azimuth is None:
        return prompts
    def values(x) -> list[float]:
        return torch.as_tensor(x, dtype=torch.float64).reshape(-1).tolist()

    azi = values(azimuth)
    ele = [0.0] * len(azi) if elevation is None else values(elevation)
    if len(azi) != batch or len(ele) != batch:
        raise ValueError(f"azimuth and elevation must be [B] = [{batch}], got {len(azi)} and {len(ele)} values")
    return [p + view_suffix(a, e, **thresholds) for p, a, e in zip(prompts, azi, ele)]


class PromptCache:
    """Encodes each (prompt, negative prompt) pair once and stacks them into batches.

    `encode(prompt, negative) -> (cond, uncond)`, each an Embeds dict of [1, ...] tensors.
    """

    def __init__(self, encode: Callable[[str, str], tuple[Embeds, Embeds]]):
        self._encode = encode
        self._cache: dict[tuple[str, str], tuple[Embeds, Embeds]] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        self._cache.clear()

    def get(self, prompts: Sequence[str], negatives: Sequence[str]) -> tuple[Embeds, Embeds]:
        """(cond, uncond) Embeds with [B, ...] tensors for B = len(prompts) samples."""
        pairs = list(zip(prompts, negatives, strict=True))
        for pair in pairs:
            if pair not in self._cache:
                with torch.no_grad():
                    cond, uncond = self._encode(*pair)
                self._cache[pair] = (
                    {k: v.detach() for k, v in cond.items()},
                    {k: v.detach() for k, v in uncond.items()},
                )
        entries = [self._cache[p] for p in pairs]
        return tuple(
            {k: torch.cat([e[i][k] for e in entries]) for k in entries[0][i]} for i in (0, 1)
        )


def encoder_for(pipe, device: torch.device) -> Callable[[str, str], tuple[Embeds, Embeds]] | None:
    """The function that embeds (prompt, negative) the way `pipe` does; None for no text input.

    - SD3-style pipelines: `encode_prompt(prompt, prompt_2, prompt_3, ...)` giving sequence and
      pooled embeddings (`encoder_hidden_states`, `pooled_projections`).
    - SD-style pipelines: `encode_prompt(prompt, device, 1, True, negative)`.
    - InstructPix2Pix: its `_encode_prompt` (returns [cond, neg, neg]).
    - A pipeline with only `tokenizer` + `text_encoder`: tokens padded to the tokenizer's
      `model_max_length`, the encoder's last hidden state (what SD's `encode_prompt` does).
    """
    if getattr(pipe, "text_encoder", None) is None and getattr(pipe, "text_encoder_2", None) is None:
        return None
    name = type(pipe).__name__
    if hasattr(pipe, "encode_prompt") and "prompt_3" in _params(pipe.encode_prompt):

        def encode_sd3(prompt: str, negative: str):
            pe, ne, pp, npp = pipe.encode_prompt(
                prompt=prompt, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
                do_classifier_free_guidance=True, negative_prompt=negative,
            )
            return (
                {"encoder_hidden_states": pe, "pooled_projections": pp},
                {"encoder_hidden_states": ne, "pooled_projections": npp},
            )

        return encode_sd3
    if "InstructPix2Pix" in name and hasattr(pipe, "_encode_prompt"):

        def encode_ip2p(prompt: str, negative: str):
            embeds = pipe._encode_prompt(prompt, device, 1, True, negative)
            return {"encoder_hidden_states": embeds[:1]}, {"encoder_hidden_states": embeds[1:2]}

        return encode_ip2p
    if hasattr(pipe, "encode_prompt") and "do_classifier_free_guidance" in _params(pipe.encode_prompt):

        def encode_sd(prompt: str, negative: str):
            pe, ne = pipe.encode_prompt(prompt, device, 1, True, negative_prompt=negative)
            return {"encoder_hidden_states": pe}, {"encoder_hidden_states": ne}

        return encode_sd
    tokenizer, text_encoder = getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)
    if tokenizer is None or text_encoder is None:
        raise ValueError(f"{name} has a text encoder but no tokenizer or encode_prompt to embed prompts with")

    def embed(text: str) -> torch.Tensor:
        ids = tokenizer(
            text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return text_encoder(ids.to(device))[0]

    def encode_plain(prompt: str, negative: str):
        return {"encoder_hidden_states": embed(prompt)}, {"encoder_hidden_states": embed(negative)}

    return encode_plain


def _params(fn) -> set[str]:
    import inspect

    return set(inspect.signature(fn).parameters)
