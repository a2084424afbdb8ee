"""`gendistill finetune` and `gendistill generate`: argparse only here; the heavy modules load when a command runs.

    gendistill finetune --config configs/video_distill/tiny_cpu.yaml output_dir=outputs/tiny max_steps=20
    accelerate launch -m gendistill finetune --config configs/video_distill/videorepa_5b_lora.yaml ...
    gendistill finetune --push-to-hub --hub-repo-id me/cogvideox-videorepa --config ... (token: HF_TOKEN)
    gendistill generate --model THUDM/CogVideoX-5b --lora outputs/run/export --prompts prompts.txt --out videos/
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

__all__ = ["add_finetune_parser", "add_generate_parser", "load_finetune_config", "run_finetune", "run_generate"]


def add_finetune_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "finetune", help="VideoREPA finetuning of a CogVideoX model (diffusion loss + token relation distillation)",
        description="Finetune a CogVideoX transformer with the VideoREPA TRD loss. Settings come from the YAML "
                    "config, then key=value overrides (e.g. output_dir=runs/a max_steps=100 optim.lr=1e-4 "
                    "resume_from_checkpoint=latest).")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/video_distill/tiny_cpu.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    hub = p.add_argument_group("Hugging Face Hub (token from HF_TOKEN or `hf auth login`, checked before training)")
    hub.add_argument("--push-to-hub", action="store_true",
                     help="upload the export folder (weights, model card README.md, config.yaml) at the end")
    hub.add_argument("--hub-repo-id", default=None, metavar="OWNER/NAME",
                     help="model repo to push to, created when missing (default: YOUR_USER/<output_dir name>)")
    hub.add_argument("--hub-private", action="store_true", help="create the repo private")
    p.set_defaults(run=run_finetune, load_config=load_finetune_config)
    return p


def load_finetune_config(args):
    """The merged FinetuneConfig of this command line (`--print-config`)."""
    from gendistill.config import load_config
    from gendistill.video_distill.finetune_config import FinetuneConfig

    return load_config(FinetuneConfig, args.config, args.overrides)


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="batch text-to-video with a (finetuned) CogVideoX pipeline to mp4")
    p.add_argument("--model", required=True, help="hub id or local folder of a CogVideoXPipeline")
    p.add_argument("--lora", default=None, help="LoRA export folder or pytorch_lora_weights.safetensors")
    p.add_argument("--transformer", default=None, help="finetuned transformer folder (a full-finetune export)")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line (or a JSON list)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--frames", type=int, default=None, help="frames per video (default: the model's, 49)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=50, help="inference steps")
    p.add_argument("--guidance-scale", type=float, default=6.0)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42, help="prompt k uses seed + k")
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"], help="weights dtype on GPU")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available); CPU runs in fp32")
    p.set_defaults(run=run_generate)
    return p


def _check_push(args, cfg):
    """Before anything loads: (repo id, token) of `--push-to-hub` (None without it); the process of global
    rank 0 also checks the account and creates the repo. Raises ValueError naming what to fix."""
    if not getattr(args, "push_to_hub", False):
        if getattr(args, "hub_repo_id", None):
            raise ValueError("--hub-repo-id is set but --push-to-hub is not; add --push-to-hub to upload the export")
        return None
    if not cfg.export:
        raise ValueError("--push-to-hub uploads the export, but export=false; drop one of them")
    from gendistill.video_distill.export import check_push

    return check_push(args.hub_repo_id, default_name=Path(cfg.output_dir).resolve().name, private=args.hub_private,
                      online=os.environ.get("RANK", "0") == "0", export_folder=Path(cfg.output_dir) / "export")


def run_finetune(args) -> int:
    from gendistill.config import load_config
    from gendistill.video_distill.finetune_config import FinetuneConfig

    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    hub = _check_push(args, cfg)
    from gendistill.video_distill.trainer import finetune

    summary = finetune(cfg)
    if summary["interrupted"] == "SIGTERM":
        return 143  # preempted: checkpointed, not finished (and not pushed)
    if hub is not None and summary["export"] is not None:
        from accelerate import PartialState

        if PartialState().is_main_process:
            from gendistill.video_distill.export import push_export

            url = push_export(summary["export"], hub[0], token=hub[1], private=args.hub_private,
                              commit_message=f"VideoREPA finetune, step {summary['step']}")
            print(f"pushed {summary['export']}/ to https://huggingface.co/{hub[0]} ({url})")
    return 0


def run_generate(args) -> None:
    import torch

    from gendistill.core.runtime import as_dtype, resolve_device
    from gendistill.video_distill.generate import generate_videos, load_video_pipeline, read_prompts

    try:
        prompts = read_prompts(args.prompts)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:  # their messages name no file
        raise ValueError(f"--prompts {args.prompts}: expected UTF-8 text, one prompt a line, or a JSON list of "
                         f"strings: {err}") from None
    device = resolve_device(args.device)
    dtype = as_dtype(args.dtype) if device.type == "cuda" else torch.float32
    pipe = load_video_pipeline(args.model, lora=args.lora, transformer=args.transformer, dtype=dtype, device=device)
    paths = generate_videos(pipe, prompts, args.out, num_frames=args.frames, height=args.height, width=args.width,
                            num_inference_steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
                            fps=args.fps, negative_prompt=args.negative_prompt, lora_scale=args.lora_scale,
                            cpu=device.type == "cpu")
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"generated {len(prompts)} video(s) in {args.out}/" + (f" ({len(paths)} by this process)"
                                                                    if len(paths) != len(prompts) else ""))

