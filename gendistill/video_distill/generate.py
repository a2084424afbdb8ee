"""Batch text-to-video with a (finetuned) CogVideoX pipeline.

    pipe = load_video_pipeline("THUDM/CogVideoX-5b", lora="outputs/run/export")
    paths = generate_videos(pipe, read_prompts("prompts.txt"), "outputs/videos", seed=42)

Under `accelerate launch` (or torchrun) the prompts are split across processes; prompt k always
uses the seed `seed + k`, so a video does not depend on how many processes made it.
Files: `<out>/<k:04d>_<slug of the prompt>.mp4`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from gendistill.core.media import write_video

__all__ = ["read_prompts", "prompt_filename", "load_video_pipeline", "generate_videos"]

def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file (one per line; blank lines and `#` comments skipped) or a JSON list of strings."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise ValueError(f"{path}: a JSON prompts file must be a list of strings")
        prompts = [p.strip() for p in data if p.strip()]
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def prompt_filename(index: int, prompt: str, max_len: int = 48) -> str:
    """'0003_a-red-ball-bounces.mp4': the prompt's index and a filesystem-safe slug."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:max_len].rstrip("-") or "prompt"
    return f"{index:04d}_{slug}.mp4"


def load_video_pipeline(model: str | os.PathLike, *, lora: str | os.PathLike | None = None,
                        transformer: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
                        device: str | torch.device | None = None):
    """A `CogVideoXPipeline` (core's `load_pipeline`) from a hub id or local folder, optionally with a
    finetuned transformer folder (a full-finetune export) and / or LoRA weights (a folder holding
    pytorch_lora_weights.safetensors, or the file)."""
    from diffusers import CogVideoXTransformer3DModel

    from gendistill.core.guidance.load import load_pipeline
    from gendistill.video_distill.trainer import load_component

    kwargs = {}
    if transformer is not None:
        tdir = Path(transformer)
        if (tdir / "transformer" / "config.json").is_file():  # an export folder: take its transformer/
            tdir = tdir / "transformer"
        kwargs["transformer"] = load_component(CogVideoXTransformer3DModel, str(tdir), "transformer", dtype=dtype)
    pipe = load_pipeline(str(model), dtype=dtype, device=device or "cpu", **kwargs)
    if lora is not None:
        lora = Path(lora)
        if lora.is_dir():
            if not (lora / "pytorch_lora_weights.safetensors").is_file():
                raise FileNotFoundError(f"{lora} holds no pytorch_lora_weights.safetensors")
            pipe.load_lora_weights(str(lora), weight_name="pytorch_lora_weights.safetensors")
        elif lora.is_file():
            pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        else:
            raise FileNotFoundError(f"LoRA weights {lora} do not exist")
    return pipe


@torch.no_grad()
def generate_videos(pipe, prompts: Sequence[str], out_dir: str | os.PathLike, *, num_frames: int | None = None,
                    height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                    guidance_scale: float = 6.0, seed: int = 42, fps: float = 8.0, negative_prompt: str | None = None,
                    lora_scale: float = 1.0, cpu: bool | None = None) -> list[Path]:
    """Generate one video per prompt into `out_dir`; returns the paths this process wrote.

    num_frames / height / width default to the transformer's sample size (49 x 480 x 720 for CogVideoX).
    Prompt k is generated with a generator seeded `seed + k`.
    """
    from accelerate import PartialState

    device = pipe.device if cpu is None else torch.device("cpu")
    state = PartialState(cpu=device.type == "cpu")
    if device.type == "cuda" and state.num_processes > 1:
        pipe.to(state.device)
        device = state.device
    cfg = pipe.transformer.config
    num_frames = num_frames or cfg.sample_frames
    height = height or cfg.sample_height * pipe.vae_scale_factor_spatial
    width = width or cfg.sample_width * pipe.vae_scale_factor_spatial
    out_dir = Path(out_dir)
    pipe.set_progress_bar_config(disable=True)
    written = []
    with state.split_between_processes(list(enumerate(prompts))) as mine:
        for k, prompt in tqdm(mine, desc="generate", unit="video", disable=not state.is_local_main_process):
            generator = torch.Generator(device=device).manual_seed(seed + k)
            frames = pipe(prompt=prompt, negative_prompt=negative_prompt, num_frames=num_frames, height=height,
                          width=width, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          generator=generator, output_type="np", max_sequence_length=cfg.max_text_seq_length,
                          attention_kwargs={"scale": lora_scale} if lora_scale != 1.0 else None).frames[0]
            path = out_dir / prompt_filename(k, prompt)
            write_video(path, frames, fps=fps)
            written.append(path)
    state.wait_for_everyone()
    return written
