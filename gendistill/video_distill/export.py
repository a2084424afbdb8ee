"""Validation videos and the export of a `VideoREPATrainer` run: `validation/step-N_prompt-K.mp4`, and
`export/` with the LoRA weights (`pytorch_lora_weights.safetensors`) or `transformer/`, plus the align
heads `projector/` and `aligner/` as diffusers models. Both are written atomically: a run killed at any
moment leaves a video whole or absent, and the previous export, the whole new one, or none."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from gendistill.config import to_yaml
from gendistill.core.io import clear_trash, replace_dir
from gendistill.core.media import write_video

logger = logging.getLogger("gendistill.video_distill")

__all__ = ["ExportMixin"]


class ExportMixin:
    """Validation and export methods of `VideoREPATrainer` (it provides cfg, accelerator, student, out,
    step, device, scheduler, tokenizer, text_encoder, vae, text_length, `_sharded` and
    `_distributed_kind`)."""

    def _pipeline(self):
        from diffusers import CogVideoXPipeline

        scheduler = self.scheduler.__class__.from_config(self.scheduler.config)
        pipe = CogVideoXPipeline(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
                                 transformer=self.accelerator.unwrap_model(self.student).transformer,
                                 scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def validate(self) -> list[Path]:
        """Generate every validation prompt (split across processes); write validation/step-N_prompt-K.mp4."""
        cfg, acc = self.cfg, self.accelerator
        v = cfg.validation
        if not v.prompts:
            return []
        if self._distributed_kind == "FSDP":
            logger.warning("validation is not run under FSDP (sharded weights); generate from the export instead")
            return []
        transformer = acc.unwrap_model(self.student).transformer
        was_training = transformer.training
        transformer.eval()
        pipe = self._pipeline()
        written = []
        with acc.split_between_processes(list(enumerate(v.prompts))) as mine:
            for i, prompt in mine:
                generator = torch.Generator(device=self.device).manual_seed(v.seed + i)
                with acc.autocast():
                    frames = pipe(prompt=prompt, num_frames=v.num_frames or cfg.data.num_frames,
                                  height=v.height or cfg.data.height, width=v.width or cfg.data.width,
                                  num_inference_steps=v.num_inference_steps, guidance_scale=v.guidance_scale,
                                  generator=generator, output_type="np", max_sequence_length=self.text_length).frames[0]
                path = self.out / "validation" / f"step-{self.step:06d}_prompt-{i:02d}.mp4"
                write_video(path, frames, fps=v.fps)
                written.append(path)
        transformer.train(was_training)
        acc.wait_for_everyone()
        return written

    def export(self, folder: str | os.PathLike | None = None) -> Path:
        """Write the trained weights: LoRA (`pytorch_lora_weights.safetensors`) or `transformer/`, plus the
        align heads as diffusers models (`projector/`, `aligner/`: `Projector.from_pretrained(folder / "projector")`)."""
        acc = self.accelerator
        folder = Path(folder) if folder else self.out / "export"
        state = acc.get_state_dict(self.student)  # every process takes part (gathers sharded weights)
        if acc.is_main_process:
            tmp = folder.parent / f".tmp-{folder.name}"
            clear_trash(folder.parent, folder.name + "-")  # what killed runs left
            for stale in (tmp, folder.parent / f".old-{folder.name}"):  # .old-: written by earlier versions
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
            student = acc.unwrap_model(self.student)
            tr_state = {k[len("transformer."):]: v for k, v in state.items() if k.startswith("transformer.")}
            if self.cfg.training_type == "lora":
                from diffusers import CogVideoXPipeline
                from peft.utils import get_peft_model_state_dict

                lora = get_peft_model_state_dict(student.transformer, state_dict=tr_state)
                CogVideoXPipeline.save_lora_weights(
                    tmp, transformer_lora_layers={k: v.detach().float().cpu().contiguous() for k, v in lora.items()},
                    transformer_lora_adapter_metadata=student.transformer.peft_config["default"].to_dict())
            else:
                transformer = student.transformer
                if self._sharded:
                    transformer = transformer.__class__.from_config(transformer.config)
                    transformer.load_state_dict(tr_state)
                transformer.save_pretrained(tmp / "transformer")
            for name in ("projector", "aligner"):  # diffusers models: from_pretrained loads them back
                head = getattr(student, name, None)
                if head is not None:
                    part = {k[len(name) + 1:]: v.detach().float().cpu() for k, v in state.items()
                            if k.startswith(name + ".")}
                    copy = type(head).from_config(head.config)
                    copy.load_state_dict(part)
                    copy.save_pretrained(tmp / name) if part else copy.save_config(tmp / name)
            (tmp / "config.yaml").write_text(to_yaml(self.cfg))
            replace_dir(tmp, folder)  # fsynced, then renamed: a killed run leaves the old export, the new one or none
        acc.wait_for_everyone()
        return folder
