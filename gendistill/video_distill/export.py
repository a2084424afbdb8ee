"""Validation videos and the export of a `VideoREPATrainer` run: `validation/step-N_prompt-K.mp4`, and
`export/` with the LoRA weights (`pytorch_lora_weights.safetensors`) or `transformer/`, plus the align
heads `projector/` and `aligner/` as diffusers models, `config.yaml` and a Hub model card `README.md`.
Both are written atomically: a run killed at any moment leaves a video whole or absent, and the previous
export, the whole new one, or none.

`check_push` (before training: token, offline mode, account, repo) and `push_export` (after it) upload
an export folder to the Hugging Face Hub; each failure is one `HubError` that says what to fix, and a
failed push leaves the export folder as it was."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import torch

from gendistill.config import to_yaml
from gendistill.core.architectures import is_random
from gendistill.core.io import clear_trash, replace_dir
from gendistill.core.media import write_video

logger = logging.getLogger("gendistill.video_distill")

__all__ = ["command_line", "model_card", "check_push", "push_export", "HubError", "ExportMixin"]

PAPER = "https://arxiv.org/abs/2505.23656"
LOGIN = "set HF_TOKEN or log in with `hf auth login` (`huggingface-cli login` in older huggingface_hub)"


# -- model card -------------------------------------------------------------------------------------
def command_line(argv: list[str] | None = None) -> str:
    """The command line of this process (`sys.argv`), shell-quoted; the gendistill entry point (console
    script or `python -m gendistill`, also under `accelerate launch -m`) is written `gendistill`."""
    argv = list(sys.argv if argv is None else argv)
    if argv and (Path(argv[0]).name == "gendistill" or Path(argv[0]).parts[-2:] == ("gendistill", "__main__.py")):
        argv[0] = "gendistill"
    return shlex.join(str(a) for a in argv)


def _hub_id(source: str) -> str | None:
    """The Hub id of a model source: `owner/name` as given, or read from a Hub cache folder
    (`models--owner--name/snapshots/...`); None for other local folders and `random:` sources."""
    if is_random(source):
        return None
    path = Path(source).expanduser()
    if path.exists():
        for part in reversed(path.resolve().parts):
            m = re.fullmatch(r"models--([^/]+?)--([^/]+)", part)
            if m:
                return f"{m[1]}/{m[2]}"
        return None
    return source if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.startswith((".", "~")) else None


def _base_license(source: str, revision: str | None = None) -> dict:
    """`license` (and `license_name`, `license_link`) from the base model's own card: its folder's
    README.md, or the README.md of a Hub id in the local cache (no download); {} when unknown."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    try:
        readme = None
        if not is_random(source) and (Path(source).expanduser() / "README.md").is_file():
            readme = Path(source).expanduser() / "README.md"
        elif _hub_id(source):
            cached = try_to_load_from_cache(_hub_id(source), "README.md", revision=revision)
            readme = Path(cached) if isinstance(cached, str) else None
        if readme is None:
            return {}
        data = ModelCard.load(readme, ignore_metadata_errors=True).data
    except Exception as err:  # an unreadable card of the base model must not fail the export
        logger.warning("model card: could not read the base model's licence from %s: %s", source, err)
        return {}
    return {k: getattr(data, k, None) for k in ("license", "license_name", "license_link")
            if getattr(data, k, None)}


def _method(cfg) -> str:
    a = cfg.align
    if a.loss == "trd":
        return (f"VideoREPA: diffusion loss + {a.proj_coeff:g} x TRD (Token Relation Distillation; margin "
                f"{a.margin:g}, reduction `{a.reduction}`)")
    if a.loss == "repa":
        return f"REPA alignment: diffusion loss + {a.proj_coeff:g} x negative cosine similarity of tokens"
    return "plain finetuning: diffusion loss only (no alignment, no teacher)"


def _teacher(cfg) -> str:
    t = cfg.teacher
    frames = (f"frames {t.frame_start}..{t.frame_start + t.num_frames - 1}" if t.num_frames
              else f"frames from {t.frame_start}")
    where = f"`{t.path}`" if t.path else "its default checkpoint"
    options = "".join(f", {k}={v}" for k, v in (t.options or {}).items())
    return (f"`{t.name}` ({where}), last-layer tokens{options}; {frames} at {t.image_size[0]}x{t.image_size[1]}"
            f"{', in float32' if t.dtype == 'float32' else ''}")


def model_card(cfg, *, step: int, num_clips: int | None = None, num_processes: int = 1,
               command: str | None = None):
    """The Hub model card (`huggingface_hub.ModelCard`) of an export of `cfg` after `step` optimizer steps,
    trained on `num_clips` clips; `command` defaults to `command_line()`."""
    from huggingface_hub import ModelCard, ModelCardData

    command = command_line() if command is None else command
    source = str(cfg.model.pretrained)
    base = _hub_id(source)
    lora = cfg.training_type == "lora"
    tags = ["text-to-video", "diffusers", "diffusers-training", "cogvideox"]
    tags += {"trd": ["videorepa", "token-relation-distillation"], "repa": ["repa"]}.get(cfg.align.loss, [])
    tags += ["lora"] if lora else []
    data = ModelCardData(base_model=base, library_name="diffusers", pipeline_tag="text-to-video", tags=tags,
                         **_base_license(source, cfg.model.revision))
    a, o, d, lr = cfg.align, cfg.optim, cfg.data, cfg.lora
    shown = base or source
    base_text = (f"[{base}](https://huggingface.co/{base})" if base else
                 f"`{source.removeprefix('random:')}` with random weights" if is_random(source) else f"`{source}`")
    rows = [("Method", _method(cfg)),
            ("Weights trained", f"LoRA rank {lr.rank}, alpha {lr.alpha:g} on {', '.join(lr.target_modules)}"
             if lora else "the whole transformer")]
    if a.loss != "none":
        rows += [("Aligned block", f"{a.align_layer} (1-based) of the transformer; projector width {a.projector_dim}, "
                                   f"{a.downsampler} downsampler (kernel {a.kernel_size}), temporal {a.temporal}"
                                   f"{', first latent frame dropped' if a.drop_first_frame else ''}"),
                 ("Teacher", _teacher(cfg))]
    batch = cfg.batch_size * cfg.gradient_accumulation_steps * num_processes
    rows += [("Steps trained", f"{step} optimizer steps (max_steps {cfg.max_steps})"),
             ("Batch", f"{cfg.batch_size} per process x {cfg.gradient_accumulation_steps} accumulation x "
                       f"{num_processes} process(es) = {batch} clips"),
             ("Optimizer", f"AdamW, lr {o.lr:g}, betas {tuple(o.betas)}, weight decay {o.weight_decay:g}, "
                           f"`{o.lr_scheduler}` schedule with {o.warmup_steps} warmup steps"),
             ("Precision", cfg.mixed_precision if cfg.mixed_precision != "no" else "fp32"),
             ("Data", f"{num_clips if num_clips is not None else 'unknown number of'} clips from `{d.path}`, "
                      f"{d.num_frames} frames at {d.height}x{d.width}, `{d.frame_sampling}` frame sampling"),
             ("Seed", str(cfg.seed))]
    table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v.replace('|', '/')} |" for k, v in rows])
    files = ["`pytorch_lora_weights.safetensors`: the LoRA weights of the transformer" if lora else
             "`transformer/`: the finetuned `CogVideoXTransformer3DModel`"]
    if a.loss != "none":
        files.append("`projector/`, `aligner/`: the alignment heads (used in training only; "
                     "`gendistill.core.align.Projector.from_pretrained(folder / \"projector\")`)")
    files.append("`config.yaml`: the full training config")
    load = ('pipe.load_lora_weights(MODEL)' if lora else
            'pipe.transformer = CogVideoXTransformer3DModel.from_pretrained(MODEL, subfolder="transformer",\n'
            '                                                               torch_dtype=torch.bfloat16).to("cuda")')
    prompt = (cfg.validation.prompts or ["a red ball is thrown to the right and bounces on the floor"])[0]
    imports = "CogVideoXPipeline" if lora else "CogVideoXPipeline, CogVideoXTransformer3DModel"
    body = f"""# {shown.removeprefix("random:").rstrip("/").split("/")[-1]} finetuned with VideoREPA

Finetuned from {base_text} with [VideoREPA]({PAPER}) (token relation distillation from a video
foundation model into a text-to-video diffusion transformer), by `gendistill finetune`.

## Training

{table}

## Command

```bash
{command}
```

## Files

{chr(10).join("- " + f for f in files)}

## Use

```python
import torch
from diffusers import {imports}

MODEL = "path/to/this/folder"  # or this model's Hub repo id
pipe = CogVideoXPipeline.from_pretrained("{shown}", torch_dtype=torch.bfloat16).to("cuda")
{load}
video = pipe({json.dumps(prompt)}, num_frames={d.num_frames},
             height={d.height}, width={d.width}).frames[0]
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


# -- Hub upload -------------------------------------------------------------------------------------
def _offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set now, read as huggingface_hub reads it."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return value is not None and value.upper() in {"1", "ON", "YES", "TRUE"}


def _reason(err: Exception) -> str:
    """One line saying why a Hub call failed."""
    from huggingface_hub.errors import HfHubHTTPError

    status = getattr(getattr(err, "response", None), "status_code", None)
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if isinstance(err, HfHubHTTPError) and status == 401:
        return f"the token was rejected (401): {LOGIN} with a valid token"
    if isinstance(err, HfHubHTTPError) and status == 403:
        return f"the token may not write there (403; a write token is needed): {first}"
    if isinstance(err, HfHubHTTPError):
        return first
    return f"the Hub is unreachable ({type(err).__name__}: {first})"


def check_push(repo_id: str | None, *, default_name: str, private: bool = False, online: bool = True,
               export_folder: str | os.PathLike | None = None) -> tuple[str | None, str]:
    """Check a later `push_export` before any long work: a token, not offline and, with `online`, the
    account, the token's role and the repo (created when missing; `repo_id` without an owner, or None for
    `<user>/<default_name>`, goes under the token's user). Returns (full repo id or None when not
    `online`, token); raises `HubError` naming what to fix."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    kept = f"; nothing was trained (the export goes to {export_folder}/)" if export_folder else ""
    if repo_id is not None:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as err:
            raise HubError(f"--hub-repo-id {repo_id!r} is not a Hub repo id (owner/name): {err}") from None
    token = get_token()
    if not token:
        raise HubError(f"--push-to-hub needs a Hugging Face token with write access: {LOGIN}{kept}")
    if _offline():
        raise HubError(f"--push-to-hub: the Hub is offline here (HF_HUB_OFFLINE is set); unset it or drop "
                       f"--push-to-hub{kept}")
    if not online:
        return None, token
    api = HfApi(token=token)
    try:
        who = api.whoami()
    except Exception as err:
        raise HubError(f"--push-to-hub: {_reason(err)}{kept}") from err
    role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise HubError(f"--push-to-hub: the token of {who.get('name')} is read-only; {LOGIN} with a write token{kept}")
    name = default_name if repo_id is None else repo_id
    repo_id = name if "/" in name else f"{who['name']}/{name}"
    try:
        validate_repo_id(repo_id)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    except HFValidationError as err:
        raise HubError(f"--push-to-hub: {repo_id!r} is not a Hub repo id; give one with --hub-repo-id: {err}") from None
    except Exception as err:
        raise HubError(f"--push-to-hub: cannot create or reach the repo {repo_id}: {_reason(err)}{kept}") from err
    return repo_id, token


def push_export(folder: str | os.PathLike, repo_id: str, *, token: str | None = None, private: bool = False,
                commit_message: str | None = None) -> str:
    """Upload the export `folder` to the Hub model repo `repo_id` (created when missing); returns the
    commit's URL. On any failure raises `HubError` that says the folder is kept (it is never changed)."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "README.md").is_file():
        raise HubError(f"{folder} is not an export folder (no README.md model card)")
    kept = f"the export is kept at {folder}/ (push it later with `hf upload {repo_id} {folder} .`)"
    if _offline():
        raise HubError(f"cannot push to {repo_id}: the Hub is offline here (HF_HUB_OFFLINE is set); {kept}")
    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                                 commit_message=commit_message or f"gendistill export ({folder.name})")
    except Exception as err:
        raise HubError(f"cannot push to {repo_id}: {_reason(err)}; {kept}") from err
    return getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"


class ExportMixin:
    """Validation and export methods of `VideoREPATrainer` (it provides cfg, accelerator, student, out,
    step, world, device, scheduler, tokenizer, text_encoder, vae, text_length, `_sharded` and
    `_distributed_kind`; `dataset` when it read data)."""

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

    def export(self, folder: str | os.PathLike | None = None, *, command: str | None = None) -> Path:
        """Write the trained weights: LoRA (`pytorch_lora_weights.safetensors`) or `transformer/`, plus the
        align heads as diffusers models (`projector/`, `aligner/`: `Projector.from_pretrained(folder / "projector")`),
        `config.yaml` and the model card `README.md` (`command`: the command line it names, default
        `command_line()`)."""
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
            dataset = getattr(self, "dataset", None)
            model_card(self.cfg, step=self.step, num_clips=len(dataset) if dataset is not None else None,
                       num_processes=self.world, command=command).save(tmp / "README.md")
            replace_dir(tmp, folder)  # fsynced, then renamed: a killed run leaves the old export, the new one or none
        acc.wait_for_everyone()
        return folder


class HubError(ValueError):
    """A push to the Hugging Face Hub that cannot happen; the message says what to fix (the CLI prints it
    as one line)."""
