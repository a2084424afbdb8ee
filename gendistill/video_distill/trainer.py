"""VideoREPA finetuning of a CogVideoX text-to-video transformer: diffusion loss + token relation distillation.

    cfg = load_config(FinetuneConfig, "configs/video_distill/tiny_cpu.yaml", ["max_steps=20"])
    summary = VideoREPATrainer(cfg).train()      # checkpoints, validation mp4s, export under cfg.output_dir

Per step, for a batch of clips (video [B, F, 3, H, W] in [0, 1], captions):

- latents x0 = VAE(video) * scaling_factor as [B, f, C, h, w]; prompt embeddings from T5;
  t ~ U{0..T-1}; x_t = add_noise(x0, eps, t); v = transformer(x_t, prompt, t).
- diffusion loss (CogVideoX finetuning): x0_hat = sqrt(a_t) x_t - sqrt(1 - a_t) v (v-prediction),
  mean over the batch of mean((x0_hat - x0)^2) / (1 - a_t), a_t = alpha_bar_t.
- alignment: tokens of block `align_layer` (1-based) [B, f, h', w', D] -> `Projector` (D -> Dt)
  -> `GridAligner` (drop the first latent frame, time resampled, learnable strided conv in space)
  -> [B, T', H', W', Dt], against the frozen teacher's tokens of the same clip; TRD
  (`trd_loss`, margin, reduction) or REPA (`repa_loss`, negative cosine).
- loss = diffusion + proj_coeff * alignment. The transformer (all of it, or LoRA adapters), the
  projector and the downsampler train; VAE, text encoder and teacher stay frozen.

Outputs under `output_dir`: `checkpoints/checkpoint-N/` (accelerate state + per-process trainer
state; the last `checkpoint.keep` kept), `validation/step-NNNNNN_prompt-KK.mp4`, `export/`
(`pytorch_lora_weights.safetensors` or `transformer/`, plus the heads `projector/` and `aligner/`),
`logs/train_log.jsonl`, `config.yaml`; with `report_to` (accelerate's trackers, main process only)
`logs/<tracker_project>/` (tensorboard) or `logs/wandb/`: train/loss, train/loss_diffusion,
train/loss_align, train/lr, train/grad_norm, train/clips_per_s, train/tokens_per_s (the transformer's video
tokens, summed over processes), train/max_memory_allocated_gb (GPU) or
train/rss_gb (CPU) every `log_every` steps; val/loss_diffusion, val/loss_align (`validation_loss`) and the
validation videos (validation/prompt-KK) every `validation.every` steps.

Multi-GPU / multi-node: `accelerate launch -m gendistill finetune ...` (DDP, DeepSpeed ZeRO-2, FSDP
as the accelerate config says); on CPU several processes start with `torchrun`.

Memory savers (`finetune_config`): `optim.optimizer=adamw8bit` (torchao's AdamW8bit; its compiled update on
CUDA, the same update run eagerly elsewhere), `model.layerwise_casting` (fp8 storage of the frozen VAE, text
encoder, teacher and, in LoRA training, the transformer's base weights; the adapters and every trained weight
stay in float32), `model.group_offload` (VAE and text encoder), `teacher.offload` (`OffloadedTeacher`).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gendistill.config import to_yaml
from gendistill.core.align import GridAligner, Projector, grid_to_tokens, repa_loss, trd_loss
from gendistill.core.architectures import is_random, random_model, standin_tokenizer
from gendistill.core.io import atomic_path
from gendistill.video_distill.checkpoints import CheckpointMixin
from gendistill.video_distill.distributed import agreed, check_shared_folders
from gendistill.video_distill.export import ExportMixin
from gendistill.video_distill.finetune_config import TORCHAO_HELP, FinetuneConfig, check_config, check_engine, tracker_names
from gendistill.video_distill.student import (
    AlignedStudent,
    diffusion_loss,
    encode_prompts,
    encode_video,
    pad_latent_frames,
    rotary_embeddings,
    sample_latents,
)

logger = logging.getLogger("gendistill.video_distill")

__all__ = ["load_component", "VideoREPATrainer", "finetune"]

# -- loading ----------------------------------------------------------------------------------------
def _looks_local(source: str) -> bool:
    s = str(source)
    return os.path.isabs(s) or s.startswith((".", "~")) or s.count("/") != 1 or os.path.exists(s)


def load_component(cls, source: str, what: str, device=None, **kwargs):
    """`cls.from_pretrained(source, **kwargs)` with a clear error for a missing folder or an offline hub id;
    a `random:` source is built from its architecture config with random weights on `device`."""
    if is_random(source):
        if what == "tokenizer":
            return standin_tokenizer(source, kwargs.get("subfolder"))
        return random_model(cls, source, subfolder=kwargs.get("subfolder"), dtype=kwargs.get("dtype"), device=device)
    if _looks_local(source) and not Path(source).expanduser().exists():
        raise FileNotFoundError(f"model folder {source} does not exist (model.pretrained must be a hub id like "
                                "THUDM/CogVideoX-2b or a local folder written by CogVideoXPipeline.save_pretrained)")
    try:
        return cls.from_pretrained(str(Path(source).expanduser()) if _looks_local(source) else source, **kwargs)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"could not load the {what} of {source}: {err}\nOffline, download the model on a machine with network "
            "(`huggingface-cli download <id> --local-dir <folder>`), set model.pretrained to the folder and "
            "HF_HUB_OFFLINE=1.") from err


def _dtype(mixed_precision: str) -> torch.dtype:
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


# -- memory savers ----------------------------------------------------------------------------------
def _layerwise_cast(module: torch.nn.Module, storage: str, compute: torch.dtype) -> None:
    """Store `module`'s frozen weights as `storage` ("float8_e4m3fn" / "float8_e5m2"), cast to `compute`
    layer by layer while they run (diffusers' layerwise casting). Skipped: diffusers' defaults (norms,
    positional and patch embeddings, proj_in / proj_out), the model's own `_skip_layerwise_casting_patterns`
    and `_keep_in_fp32_modules` (T5's `wo`), and PEFT adapters."""
    from diffusers import ModelMixin
    from diffusers.hooks import apply_layerwise_casting
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    dtype = getattr(torch, storage)
    if isinstance(module, ModelMixin):
        module.enable_layerwise_casting(storage_dtype=dtype, compute_dtype=compute)
        return
    keep = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
    apply_layerwise_casting(module, dtype, compute, skip_modules_pattern=(*DEFAULT_SKIP_MODULES_PATTERN, *keep, "lora_"))


def _group_offload(module: torch.nn.Module, kind: str, device: torch.device) -> None:
    """diffusers' group offloading of a frozen module: kept on the CPU, each block (`block_level`, one
    ModuleList entry at a time) or layer (`leaf_level`) moved to `device` while it runs."""
    from diffusers import ModelMixin
    from diffusers.hooks import apply_group_offloading

    per_group = 1 if kind == "block_level" else None
    if isinstance(module, ModelMixin):
        module.enable_group_offload(device, offload_type=kind, num_blocks_per_group=per_group)
    else:
        apply_group_offloading(module, device, offload_type=kind, num_blocks_per_group=per_group)


def _eager_adamw8bit(base):
    """torchao's AdamW8bit (`base`) with each parameter's update run eagerly instead of compiled: off CUDA,
    compiling the update once per parameter shape (a C++ build each) costs more than it saves."""
    from torchao.optim.adam import single_param_adam

    class EagerAdamW8bit(base):
        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for group in self.param_groups:
                beta1, beta2 = group["betas"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if not state:  # 8-bit block-quantized moments (tensors under 4096 values stay float32)
                        state.update(step=torch.tensor(0.0), exp_avg=self._new_buffer(p, True),
                                     exp_avg_sq=self._new_buffer(p, False))
                    state["step"] += 1
                    single_param_adam(p.detach(), p.grad, state["step"], state["exp_avg"], state["exp_avg_sq"], None,
                                      group["lr"], beta1, beta2, group["weight_decay"], group["eps"], True, False)
            return loss

    return EagerAdamW8bit


def _build_optimizer(name: str, params, optim, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer of `optim.optimizer`: "adamw" (torch.optim.AdamW) or "adamw8bit" (torchao's AdamW8bit,
    its moments stored in 8 bits per value, block-wise scaled; compiled on CUDA, eager elsewhere)."""
    kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay, eps=optim.eps)
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    try:
        from torchao.optim import AdamW8bit
    except ImportError as err:
        raise ImportError(TORCHAO_HELP) from err
    return (AdamW8bit if device.type == "cuda" else _eager_adamw8bit(AdamW8bit))(params, **kwargs)


# -- tracking ---------------------------------------------------------------------------------------
def _flat_config(cfg) -> dict:
    """The config as {"a.b": value} with scalar values (lists as text): tracker hyperparameters."""
    from dataclasses import asdict

    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            elif value is None or isinstance(value, (bool, int, float, str)):
                flat[prefix + key] = value
            else:
                flat[prefix + key] = json.dumps(value)

    walk(asdict(cfg), "")
    return flat


def _memory(device: torch.device) -> dict[str, float]:
    """Peak CUDA memory allocated (GiB) on a GPU; the process's resident memory (GiB) elsewhere."""
    if device.type == "cuda":
        return {"train/max_memory_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    import psutil  # an accelerate dependency

    return {"train/rss_gb": psutil.Process().memory_info().rss / 2**30}


def _tensorboard_video(writer, tag: str, frames, step: int, fps: float) -> None:
    """Frames [T, H, W, 3] uint8 as an animated GIF image summary, as `SummaryWriter.add_video` writes it,
    without its moviepy dependency (moviepy 2 lacks the `moviepy.editor` it imports)."""
    import imageio.v3 as iio
    from tensorboard.compat.proto.summary_pb2 import Summary

    gif = iio.imwrite("<bytes>", frames, extension=".gif", duration=1000.0 / fps, loop=0)
    _, h, w, c = frames.shape
    image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=gif)
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
    writer.flush()


# -- the trainer ------------------------------------------------------------------------------------
class VideoREPATrainer(CheckpointMixin, ExportMixin):
    """Holds the models, data, optimizer and accelerator of one finetuning run; `train()` runs it."""

    def __init__(self, cfg: FinetuneConfig, *, data: bool = True):
        """data=False builds models and optimizer only (no clips are read; `gendistill plan`)."""
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        check_config(cfg)
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        cpu = not torch.cuda.is_available()
        self.accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            cpu=cpu, log_with=tracker_names(cfg.report_to) or None,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
        )
        acc = self.accelerator
        self._distributed_kind = acc.distributed_type.name if hasattr(acc.distributed_type, "name") else str(acc.distributed_type)
        check_engine(cfg, self._distributed_kind)  # memory savers the engine cannot run: refused before models load
        self.device = acc.device
        self.rank, self.world = acc.process_index, acc.num_processes
        self.weight_dtype = _dtype(cfg.mixed_precision)
        set_seed(cfg.seed)  # same on every process: projector / LoRA initial weights agree
        self.nonfinite_steps = self._nonfinite_run = 0  # optimizer steps skipped for NaN/inf: all, in a row
        self.generator = torch.Generator().manual_seed(cfg.seed + 1000003 * self.rank)  # noise, t, latents
        self.step = 0  # optimizer steps done
        self.position = 0  # micro-batches consumed (data position)
        self._bucket_of = self._resumed_data_state = None  # data.buckets: each clip's bucket; a checkpoint's state
        self._stream_position = None  # shards: the readers' cursors after the batches consumed (`_data_state`)
        self._batch_tokens = self._tokens_since_log = 0  # video tokens of the last micro-batch; since the last log
        self.skipped: set[str] = set()
        self.problems: list[str] = []
        self.grad_norm = None  # of the last optimizer step (before clipping); None when it was skipped
        self._val_clips, self._val_feats = [], {}  # held-out clips (validation.data); their frozen features

        shared = [self.out] + [Path(p) for p in (cfg.data.cache_dir,) if p and data and cfg.data.cache]
        if cfg.model.tiny:
            shared.append(Path(cfg.model.pretrained).parent)
        check_shared_folders(acc, shared)  # several machines: these must be on a filesystem all of them see
        self._ensure_tiny_models()
        if data:  # the clips are found (or the path refused) before any model loads
            from gendistill.video_distill.data import discover_clips, expand_shards, is_shard_source

            if is_shard_source(cfg.data.path):  # WebDataset shards: streamed, never listed
                for key, value in (("data.buckets", cfg.data.buckets), ("data.cache", cfg.data.cache)):
                    if value:
                        raise ValueError(f"{key}: not available with WebDataset shards ({cfg.data.path}); "
                                         f"set {key}={'null' if key == 'data.buckets' else 'false'}")
                self._clips, self.problems = None, []
                expand_shards(cfg.data.path)  # a missing shard is named now
            else:
                self._clips, self.problems = discover_clips(cfg.data.path, cfg.data.root)
            self._val_clips = self._validation_clips()
        self._load_models()
        if data:
            self._build_data()
        self._build_student_and_optimizer()
        acc.register_save_state_pre_hook(self._save_state_hook)
        acc.register_load_state_pre_hook(self._load_state_hook)
        if cfg.resume_from_checkpoint and data:
            self._resume(cfg.resume_from_checkpoint)

    # -- setup -------------------------------------------------------------------------------------
    @property
    def _sharded(self) -> bool:
        return self._distributed_kind in ("DEEPSPEED", "FSDP")

    def _ensure_tiny_models(self) -> None:
        cfg = self.cfg
        if not cfg.model.tiny:
            return
        from gendistill.testing.video import tiny_pipeline, tiny_videomae, _save_atomically

        if self.accelerator.is_main_process:
            pipe_dir = Path(cfg.model.pretrained)
            if not pipe_dir.is_dir():
                _save_atomically(tiny_pipeline(), pipe_dir)
            if cfg.teacher.path and cfg.align.loss != "none" and not Path(cfg.teacher.path).exists():
                _save_atomically(tiny_videomae(), Path(cfg.teacher.path))
        self.accelerator.wait_for_everyone()

    def _validation_clips(self) -> list:
        """The first `validation.loss_clips` clips of `validation.data`, each probed (long enough for
        data.num_frames) before any model loads; [] without validation.data."""
        from gendistill.video_distill.data import discover_clips, probe_video, sample_frame_indices

        v, d = self.cfg.validation, self.cfg.data
        if not v.data:
            return []
        try:
            clips = discover_clips(v.data)[0][: v.loss_clips]
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"validation.data: {err}") from None
        for clip in clips:
            try:
                info = probe_video(clip.video)
                sample_frame_indices(info.frames, d.num_frames, d.frame_sampling, fps=d.fps, source_fps=info.fps,
                                     times=info.times)  # a variable-frame-rate clip: by its frame times
            except ValueError as err:
                raise ValueError(f"validation.data: {clip.video}: {err}") from None
        return clips

    def _load_models(self) -> None:
        from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXTransformer3DModel
        from transformers import AutoTokenizer, T5EncoderModel

        cfg, dev, wd = self.cfg, self.device, self.weight_dtype
        src = cfg.model.pretrained
        kw = {"revision": cfg.model.revision} if cfg.model.revision else {}
        vkw = dict(kw, **({"variant": cfg.model.variant} if cfg.model.variant else {}))
        frozen_dev = torch.device("cpu") if cfg.model.group_offload else dev  # group offloading: kept on the CPU
        self.tokenizer = load_component(AutoTokenizer, src, "tokenizer", subfolder="tokenizer", **kw)
        self.text_encoder = load_component(T5EncoderModel, src, "text encoder", frozen_dev, subfolder="text_encoder",
                                           dtype=wd, **vkw)
        self.vae = load_component(AutoencoderKLCogVideoX, src, "VAE", frozen_dev, subfolder="vae", dtype=wd, **vkw)
        train_dtype = wd if cfg.training_type == "lora" else torch.float32  # LoRA: frozen base in low precision
        self.transformer = load_component(CogVideoXTransformer3DModel, src, "transformer", dev, subfolder="transformer",
                                 dtype=train_dtype, **vkw)
        self.scheduler = load_component(CogVideoXDPMScheduler, src, "scheduler", subfolder="scheduler", **kw)
        if self.scheduler.config.prediction_type != "v_prediction":
            raise ValueError(f"{src}: the scheduler predicts {self.scheduler.config.prediction_type!r}; "
                             "the CogVideoX finetuning loss needs v_prediction")
        for m in (self.text_encoder, self.vae):
            m.requires_grad_(False).eval()
            if cfg.model.layerwise_casting:  # before offloading: the CPU copy is the fp8 one
                _layerwise_cast(m, cfg.model.layerwise_casting, wd)
            if cfg.model.group_offload:
                _group_offload(m, cfg.model.group_offload, dev)
            else:
                m.to(dev)
        if cfg.model.vae_slicing:
            self.vae.enable_slicing()
        if cfg.model.vae_tiling:
            self.vae.enable_tiling()
        self.transformer.to(dev)
        n_blocks = len(self.transformer.transformer_blocks)
        if cfg.align.loss != "none" and not 1 <= cfg.align.align_layer <= n_blocks:
            raise ValueError(f"align.align_layer={cfg.align.align_layer} but the transformer has {n_blocks} blocks "
                             "(1-based: 1..{n_blocks})".replace("{n_blocks}", str(n_blocks)))
        self.vae_scale_spatial = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.vae_scale_temporal = self.vae.config.temporal_compression_ratio
        self.text_length = self.transformer.config.max_text_seq_length
        self.teacher = None
        if cfg.align.loss != "none":
            from gendistill.video_distill.teachers import OffloadedTeacher

            self.teacher = OffloadedTeacher(self._load_teacher, dev) if cfg.teacher.offload else \
                self._load_teacher().to(dev)

    def _load_teacher(self):
        """The teacher of `cfg.teacher`, on the CPU (stored in fp8 with model.layerwise_casting)."""
        from gendistill.video_distill.teachers import load_teacher

        cfg, t = self.cfg, self.cfg.teacher
        teacher = load_teacher(t.name, t.path, num_frames=t.num_frames, frame_start=t.frame_start,
                               image_size=tuple(t.image_size),
                               dtype=torch.float32 if t.dtype == "float32" else self.weight_dtype, **dict(t.options))
        if cfg.model.layerwise_casting:
            compute = teacher.dtype
            _layerwise_cast(teacher.model, cfg.model.layerwise_casting, compute)
            teacher.compute_dtype = compute
        return teacher

    def _cache_settings(self) -> dict:
        cfg = self.cfg
        from gendistill.video_distill.data import model_identity

        settings = {
            "model": model_identity(cfg.model.pretrained, ("vae", "text_encoder", "tokenizer")),
            "revision": cfg.model.revision, "num_frames": cfg.data.num_frames, "height": cfg.data.height,
            "width": cfg.data.width, "sampling": cfg.data.frame_sampling, "text_length": self.text_length,
            "dtype": str(self.weight_dtype), "teacher": None,
        }
        if cfg.data.frame_sampling == "fps":
            settings["fps"] = cfg.data.fps
        if cfg.model.layerwise_casting:  # fp8 weights change the features (absent otherwise: older keys stay valid)
            settings["layerwise_casting"] = cfg.model.layerwise_casting
        if self.teacher is not None:
            t = cfg.teacher
            settings["teacher"] = {"name": t.name, "id": model_identity(t.path) if t.path else None,
                                   "num_frames": t.num_frames, "frame_start": t.frame_start,
                                   "image_size": list(t.image_size), "options": dict(t.options), "dtype": t.dtype}
        return settings

    @torch.no_grad()
    def _encode_clip_batch(self, video: torch.Tensor, captions: list[str]) -> dict:
        """Frozen-model features of a batch: latent parameters, prompt embeddings, teacher tokens."""
        out = {"latent_params": encode_video(self.vae, video),
               "prompt_embeds": encode_prompts(self.tokenizer, self.text_encoder, captions, self.text_length)}
        if self.teacher is not None:
            out["teacher"] = self.teacher(video.to(self.device))
        return out

    def _precompute(self, clips, shapes=None):
        """Fill the feature cache for `clips` (split across processes; `shapes`: one (frames, height, width)
        per clip, from its bucket); return (indices of the cached clips, their keys, the cache)."""
        from accelerate.utils import broadcast_object_list

        from gendistill.video_distill.data import FeatureCache, clip_fingerprint, file_digests, load_clip

        cfg, acc = self.cfg, self.accelerator
        cache = FeatureCache(cfg.data.cache_dir or self.out / "cache")
        keys = None
        if acc.is_main_process:  # one process reads the videos (or the digest index), all get the keys
            settings = self._cache_settings()
            digests = file_digests([c.video for c in clips], cache.folder / "file_digests.json")
            per_clip = [dict(settings, num_frames=f, height=h, width=w) for f, h, w in shapes] if shapes else None
            keys = [clip_fingerprint(c, per_clip[i] if per_clip else settings, d)
                    for i, (c, d) in enumerate(zip(clips, digests))]
        keys = broadcast_object_list([keys])[0]
        todo = [i for i, k in enumerate(keys) if k not in cache]
        resident = getattr(self.teacher, "resident", contextlib.nullcontext)  # an offloaded teacher: moved once
        with acc.split_between_processes(todo) as mine, resident():
            for i in tqdm(mine, desc="precompute", unit="clip", disable=not acc.is_local_main_process):
                try:
                    shape = shapes[i] if shapes else (cfg.data.num_frames, cfg.data.height, cfg.data.width)
                    video = load_clip(clips[i].video, *shape, cfg.data.frame_sampling, cfg.data.fps)
                except Exception as err:  # unreadable / too short: counted, never fatal
                    logger.warning("skipping clip %s: %s", clips[i].video, err)
                    continue
                feats = self._encode_clip_batch(video[None], [clips[i].caption])
                cache.save(keys[i], {k: v[0] for k, v in feats.items()})
        acc.wait_for_everyone()
        ok = [i for i, k in enumerate(keys) if k in cache]
        ok_set = set(ok)
        self.skipped.update(str(clips[i].video) for i in range(len(clips)) if i not in ok_set)
        if acc.is_main_process:
            print(f"feature cache {cache.folder}/: {len(ok)} clips ready ({len(todo)} computed now, "
                  f"{len(clips) - len(ok)} unreadable)")
        if not ok:
            raise ValueError("no clip could be read; see the warnings above")
        if getattr(self.teacher, "loaded", True) is False:  # an offloaded teacher not needed: its width from the cache
            self.teacher.hidden_size = cache.load(keys[ok[0]])["teacher"].shape[-1]
        return ok, [keys[i] for i in ok], cache

    def _bucket(self, clips, buckets):
        """`bucket_clips` on the main process, its headers recorded beside the feature cache's file digests
        (a restart stats the clips instead of opening each), the result sent to every process."""
        from accelerate.utils import broadcast_object_list

        from gendistill.video_distill.data import bucket_clips

        cfg, result = self.cfg, None
        if self.accelerator.is_main_process:
            index = Path(cfg.data.cache_dir or self.out / "cache") / "video_headers.json"
            try:
                result = bucket_clips(clips, buckets, cfg.data.frame_sampling, cfg.data.fps, index=index)
            except ValueError as err:  # no clip fits: every process raises it
                result = err
        result = broadcast_object_list([result])[0]
        if isinstance(result, ValueError):
            raise result
        return result

    def _build_data(self) -> None:
        from torch.utils.data import DataLoader

        from gendistill.video_distill.data import VideoClipDataset, collate_clips

        cfg, clips = self.cfg, self._clips
        cache = keys = shapes = self._bucket_of = None
        if clips is None:  # shards: each process streams its own; a resume goes on at its readers' cursors
            from gendistill.video_distill.data import ShardStreamPosition, WebDatasetClips

            def stream(start: int):
                shards = WebDatasetClips(cfg.data.path, num_frames=cfg.data.num_frames, height=cfg.data.height,
                                         width=cfg.data.width, sampling=cfg.data.frame_sampling, fps=cfg.data.fps,
                                         seed=cfg.seed, shuffle=cfg.data.shuffle, epoch=start, epochs=None,
                                         rank=self.rank, world=self.world)
                readers, state = max(1, cfg.data.num_workers), self._resumed_data_state
                if start or state is not None:  # a resume: exact when the checkpoint's position fits this run
                    problem = shards.state_problem(state, readers)
                    if problem:
                        logger.warning("%s: reading a fresh epoch of shards (epoch %d) instead of going on "
                                       "where the checkpoint stopped", problem, start)
                        state = None
                shards.state = state
                self._stream_position = ShardStreamPosition(shards, readers, state)
                return DataLoader(shards, batch_size=cfg.batch_size, collate_fn=collate_clips,
                                  num_workers=cfg.data.num_workers)

            self._collate, self._make_loader = collate_clips, stream
            self.dataset = None
            return
        if cfg.data.buckets:  # each clip to its bucket; the ones that fit none are skipped (warned, counted)
            buckets = [tuple(b) for b in cfg.data.buckets]
            of, left_out = self._bucket(clips, buckets)
            self.skipped.update(left_out)
            clips, self._bucket_of = [c for c, b in zip(clips, of) if b is not None], [b for b in of if b is not None]
            shapes = [buckets[b] for b in self._bucket_of]
        if cfg.data.cache:
            ok, keys, cache = self._precompute(clips, shapes)
            clips = [clips[i] for i in ok]
            if shapes:
                shapes, self._bucket_of = [shapes[i] for i in ok], [self._bucket_of[i] for i in ok]
        self.dataset = VideoClipDataset(clips, num_frames=cfg.data.num_frames, height=cfg.data.height,
                                        width=cfg.data.width, sampling=cfg.data.frame_sampling, fps=cfg.data.fps,
                                        shapes=shapes, cache=cache, keys=keys)
        self._collate = collate_clips
        self._make_loader = lambda start: DataLoader(
            self.dataset, batch_sampler=self._sampler(start), collate_fn=collate_clips,
            num_workers=cfg.data.num_workers, persistent_workers=False)

    def _sampler(self, start: int):
        from gendistill.video_distill.data import BucketBatchSampler, ResumableBatchSampler

        if self._bucket_of is None:
            return ResumableBatchSampler(len(self.dataset), self.cfg.batch_size, num_replicas=self.world,
                                         rank=self.rank, seed=self.cfg.seed, shuffle=self.cfg.data.shuffle, start=start)
        self.batch_sampler = BucketBatchSampler(  # kept: its state goes into checkpoints (`_data_state`)
            self._bucket_of, self.cfg.batch_size, num_replicas=self.world, rank=self.rank, seed=self.cfg.seed,
            shuffle=self.cfg.data.shuffle, start=start, state=self._resumed_data_state,
            names=[str(list(b)) for b in self.cfg.data.buckets])
        return self.batch_sampler

    def _data_state(self) -> dict | None:
        """The data position after the micro-batches consumed (`position`): the bucket sampler's state, or the
        shard stream's readers' cursors (`ShardStreamPosition.state()`); None otherwise."""
        if self._stream_position is not None:
            return self._stream_position.state()
        sampler = getattr(self, "batch_sampler", None)
        return sampler.state_at(self.position) if sampler is not None else None

    def _new_modules(self, tr) -> AlignedStudent:
        """LoRA adapters (for lora), projector and aligner on `tr`, gradient checkpointing: the student."""
        cfg = self.cfg
        if cfg.training_type == "lora":
            from peft import LoraConfig as PeftLoraConfig

            width = tr.config.num_attention_heads * tr.config.attention_head_dim
            if not 1 <= cfg.lora.rank <= width:
                raise ValueError(f"lora.rank={cfg.lora.rank} must be in [1, {width}] (the transformer's width)")

            tr.requires_grad_(False)
            tr.add_adapter(PeftLoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                          init_lora_weights=True, target_modules=list(cfg.lora.target_modules)))
            for p in tr.parameters():  # adapters train in float32 whatever the base's precision
                if p.requires_grad:
                    p.data = p.data.float()
            if cfg.model.layerwise_casting:  # the frozen base in fp8; PEFT's adapter layers skipped
                _layerwise_cast(tr, cfg.model.layerwise_casting, self.weight_dtype)
        if cfg.gradient_checkpointing:
            tr.enable_gradient_checkpointing()
        projector = aligner = None
        if self.teacher is not None:
            width = tr.config.num_attention_heads * tr.config.attention_head_dim
            d_t = self.teacher.hidden_size
            projector = Projector(width, d_t, hidden=cfg.align.projector_dim)
            aligner = GridAligner(d_t, d_t, mode=cfg.align.downsampler, drop_first_frame=cfg.align.drop_first_frame,
                                  kernel_size=cfg.align.kernel_size, temporal=cfg.align.temporal)
        return AlignedStudent(tr, projector, aligner, cfg.align.align_layer).to(self.device)

    def _build_student_and_optimizer(self) -> None:
        from gendistill.video_distill.lr_schedules import build_scheduler

        cfg, acc = self.cfg, self.accelerator
        tr = self.transformer
        with torch.random.fork_rng(devices=[]):  # new modules seeded from the config, whatever ran before
            torch.manual_seed(cfg.seed)
            student = self._new_modules(tr)
        if cfg.align.heads and student.projector is not None:
            from gendistill.video_distill.heads import load_heads

            load_heads(student, cfg.align.heads)
        params = [p for p in student.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in params)
        optimizer = _build_optimizer(cfg.optim.optimizer, params, cfg.optim, self.device)
        # accelerate steps a prepared scheduler once per process per optimizer step
        lr_scheduler = build_scheduler(cfg.optim.lr_scheduler, optimizer, warmup_steps=cfg.optim.warmup_steps,
                                       total_steps=cfg.max_steps, calls_per_step=self.world,
                                       num_cycles=cfg.optim.num_cycles, power=cfg.optim.power)
        if self._distributed_kind == "DEEPSPEED":
            ds = acc.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
        self.student, self.optimizer, self.lr_scheduler = acc.prepare(student, optimizer, lr_scheduler)
        self.params = params

    # -- training ----------------------------------------------------------------------------------
    def _batch_features(self, batch: dict, generator: torch.Generator) -> dict:
        if "latent_params" in batch:  # from the cache
            feats = {k: batch[k].to(self.device) for k in ("latent_params", "prompt_embeds", "teacher") if k in batch}
        else:
            feats = self._encode_clip_batch(batch["video"].to(self.device), batch["caption"])
        latents = sample_latents(feats["latent_params"], self.vae.config.scaling_factor, generator)
        feats["latents"] = pad_latent_frames(latents, self.transformer.config.patch_size_t)  # CogVideoX 1.5
        return feats

    def compute_losses(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Losses of one micro-batch: {"loss", "diffusion", "align"} scalars (with graph when grad is enabled).

        Latent samples, noise and timesteps come from `generator` (the trainer's own by default).
        """
        cfg = self.cfg
        g = self.generator if generator is None else generator
        feats = self._batch_features(batch, g)
        latents = feats["latents"]
        B, f, _, h, w = latents.shape
        noise = torch.randn(latents.shape, generator=g).to(self.device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (B,), generator=g).to(self.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        rotary = rotary_embeddings(self.transformer.config, latent_frames=f, latent_height=h, latent_width=w,
                                   device=self.device)
        prompt_embeds = feats["prompt_embeds"].to(self.weight_dtype)
        teacher = feats.get("teacher")
        grid = tuple(teacher.shape[1:4]) if teacher is not None else None
        pt, p = self.transformer.config.patch_size_t or 1, self.transformer.config.patch_size
        self._batch_tokens = B * (f // pt) * (h // p) * (w // p)  # video tokens the transformer saw (tokens/s)
        pred, aligned = self.student(noisy, prompt_embeds, t, rotary, grid)
        loss_diff = diffusion_loss(self.scheduler.alphas_cumprod, pred, noisy, latents, t)
        loss_align = torch.zeros((), device=self.device)
        if aligned is not None:
            if cfg.align.loss == "trd":
                loss_align = trd_loss(grid_to_tokens(aligned), grid_to_tokens(teacher.float()), margin=cfg.align.margin,
                                      reduction=cfg.align.reduction, chunk_size=cfg.align.chunk_size)
            else:
                loss_align = repa_loss(aligned, teacher.float())
        return {"loss": loss_diff + cfg.align.proj_coeff * loss_align, "diffusion": loss_diff, "align": loss_align}

    def step_tensors(self, batch: dict) -> dict[str, torch.Tensor]:
        """Forward, losses, backward and (when accumulation completes) the optimizer step of one
        micro-batch; the losses as tensors (`gendistill plan` runs this under fake tensors)."""
        cfg, acc = self.cfg, self.accelerator
        with acc.accumulate(self.student):
            losses = self.compute_losses(batch)
            acc.backward(losses["loss"])
            skip = acc.sync_gradients and self._nonfinite(losses["loss"])
            if acc.sync_gradients:  # the norm is logged; max_grad_norm <= 0 measures it without clipping
                max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
                self.grad_norm = None if skip else acc.clip_grad_norm_(self.params, max_norm)
            if not skip:
                self.optimizer.step()
                self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return losses

    def _nonfinite(self, loss: torch.Tensor) -> bool:
        """Whether this optimizer step's loss or gradients hold NaN/inf on any rank (a flag all ranks
        agree on, so they skip or stop together); `max_nonfinite_steps` in a row stop the run."""
        from torch._subclasses.fake_tensor import is_fake

        if is_fake(loss):  # `gendistill plan`: no values
            return False
        finite = [torch.isfinite(loss.detach()).all()]
        finite += [torch.isfinite(p.grad).all() for p in self.params if p.grad is not None]
        skip = agreed(self.accelerator, not bool(torch.stack(finite).all()))  # one device sync
        self.nonfinite_steps += int(skip)
        self._nonfinite_run = self._nonfinite_run + 1 if skip else 0
        if self._nonfinite_run >= self.cfg.max_nonfinite_steps:
            raise FloatingPointError(f"{self._nonfinite_run} optimizer steps in a row had NaN/inf losses or "
                                     f"gradients (step {self.step + 1}); the last checkpoint is intact: try a lower "
                                     "optim.lr, mixed_precision=bf16 instead of fp16, or optim.max_grad_norm")
        return skip

    def training_step(self, batch: dict) -> dict[str, float]:
        """One micro-batch (`step_tensors`), counted; the losses as floats."""
        losses = self.step_tensors(batch)
        self.position += 1
        self._tokens_since_log += self._batch_tokens
        self.skipped.update(batch["skipped"])
        if "cursor" in batch and self._stream_position is not None:
            self._stream_position.consumed(batch["cursor"])
        return {k: v.item() for k, v in losses.items()}

    def _log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            path = self.out / "logs" / "train_log.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- tracking and the validation loss ---------------------------------------------------------
    def _start_tracking(self) -> None:
        """Start accelerate's trackers (`report_to`; main process, once), the config as hyperparameters."""
        acc = self.accelerator
        if not acc.log_with or acc.trackers:
            return
        kwargs = {"wandb": {"name": self.out.name, "dir": str(self.out / "logs")}}
        if self.step:  # resumed: tensorboard drops the earlier events of the steps run again
            kwargs["tensorboard"] = {"purge_step": self.step + 1}
        acc.init_trackers(self.cfg.tracker_project, config=_flat_config(self.cfg), init_kwargs=kwargs)

    def _track(self, record: dict, seconds: float, steps: int) -> None:
        """Send a logged step to the trackers: its losses and lr, the grad norm, clips/s over the `steps`
        optimizer steps since the last log (`seconds` of training), memory."""
        acc, cfg = self.accelerator, self.cfg
        if not acc.trackers:  # report_to=none, or not the main process
            return
        values = {"train/loss": record["loss"], "train/loss_diffusion": record["diffusion"], "train/lr": record["lr"]}
        if self.teacher is not None:
            values["train/loss_align"] = record["align"]
        if self.grad_norm is not None:
            values["train/grad_norm"] = float(self.grad_norm)
        if seconds > 0:
            clips = steps * cfg.batch_size * cfg.gradient_accumulation_steps * self.world
            values["train/clips_per_s"] = clips / seconds
            values["train/tokens_per_s"] = self._tokens_since_log * self.world / seconds  # this process's x world
        values.update(_memory(self.device))
        acc.log(values, step=record["step"])

    def _val_features(self, i: int) -> dict:
        """Frozen-model features of held-out clip i (computed once, kept on the CPU)."""
        from gendistill.video_distill.data import load_clip

        if i not in self._val_feats:
            d, clip = self.cfg.data, self._val_clips[i]
            video = load_clip(clip.video, d.num_frames, d.height, d.width, d.frame_sampling, d.fps)
            feats = self._encode_clip_batch(video[None], [clip.caption])
            self._val_feats[i] = {k: v[0].cpu() for k, v in feats.items()}
        return self._val_feats[i]

    @torch.no_grad()
    def validation_loss(self) -> dict[str, float]:
        """Mean losses over the held-out clips (the first `validation.loss_clips` of `validation.data`),
        clip K drawing its latent sample, noise and timestep from seed `validation.seed + K`: the same
        weights give the same values. {"val/loss_diffusion", "val/loss_align" (alignment on)}; {} without
        validation.data. Every process takes part (an equal share of the clips) and gets the result."""
        from accelerate.utils import gather_object

        if not self._val_clips:
            return {}
        acc, seed = self.accelerator, self.cfg.validation.seed
        was_training = self.student.training
        self.student.eval()
        results = []
        with acc.split_between_processes(list(range(len(self._val_clips))), apply_padding=True) as mine:
            for i in mine:  # padding repeats a clip: every process runs as many forwards (sharded models)
                feats = self._val_features(i)
                losses = self.compute_losses({k: v[None] for k, v in feats.items()},
                                             torch.Generator().manual_seed(seed + i))
                results.append((i, float(losses["diffusion"]), float(losses["align"])))
        self.student.train(was_training)
        per_clip = {i: (d, a) for i, d, a in (gather_object(results) if self.world > 1 else results)}
        order = sorted(per_clip)
        out = {"val/loss_diffusion": sum(per_clip[i][0] for i in order) / len(order)}
        if self.teacher is not None:
            out["val/loss_align"] = sum(per_clip[i][1] for i in order) / len(order)
        return out

    def _track_validation(self, values: dict[str, float]) -> None:
        """Send the validation losses and this step's validation videos to the trackers (main process):
        tensorboard as animated images, wandb as `wandb.Video`; tag validation/prompt-KK."""
        from gendistill.core.media import read_video

        acc, v = self.accelerator, self.cfg.validation
        if not acc.trackers:
            return
        if values:
            acc.log(values, step=self.step)
        for path in sorted((self.out / "validation").glob(f"step-{self.step:06d}_prompt-*.mp4")):
            k = int(path.stem.rsplit("-", 1)[1])
            tag = f"validation/prompt-{k:02d}"
            for tracker in acc.trackers:
                if tracker.name == "tensorboard":
                    _tensorboard_video(tracker.writer, tag, read_video(path), self.step, v.fps)
                elif tracker.name == "wandb":
                    import wandb

                    tracker.run.log({tag: wandb.Video(str(path), caption=v.prompts[k])}, step=self.step)

    def _total_skipped(self) -> int:
        from accelerate.utils import gather_object

        every = gather_object([sorted(self.skipped)]) if self.world > 1 else [sorted(self.skipped)]
        return len({p for paths in every for p in paths})

    def train(self) -> dict:
        """Run until `max_steps` optimizer steps; checkpoint, validate, export. Returns a summary dict.

        The trackers stay open for more logging: `accelerator.end_training()` ends them (`finetune` does)."""
        cfg, acc = self.cfg, self.accelerator
        if acc.is_main_process:
            (self.out / "logs").mkdir(parents=True, exist_ok=True)
            with atomic_path(self.out / "config.yaml") as tmp:
                tmp.write_text(to_yaml(cfg))
            clips = f"{len(self.dataset)} clips" if self._clips is not None else f"clips streamed from {cfg.data.path}"
            print(f"finetune ({cfg.training_type}, align {cfg.align.loss}): {clips}, "
                  f"{self.n_trainable:,} trainable parameters, {self.world} process(es), output {self.out}/")
        self._start_tracking()
        self.student.train()
        history = []
        start_time = time.perf_counter()
        busy, since = 0.0, 0  # seconds in training steps and optimizer steps since the last log
        loader = iter(self._make_loader(self.position))
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="finetune", unit="step",
                   disable=not acc.is_local_main_process)
        accum: list[dict] = []
        preempted = _Flag(signal.SIGTERM)  # preemption: checkpoint, then stop (the CLI exits 143)
        while self.step < cfg.max_steps:
            tick = time.perf_counter()
            metrics = self.training_step(next(loader))
            busy += time.perf_counter() - tick
            accum.append(metrics)
            if not acc.sync_gradients:
                continue
            self.step += 1
            since += 1
            bar.update(1)
            record = {k: sum(m[k] for m in accum) / len(accum) for k in accum[0]}
            record.update(step=self.step, lr=float(self.lr_scheduler.get_last_lr()[0]), skipped=len(self.skipped),
                          skipped_nonfinite=self.nonfinite_steps)
            accum = []
            history.append(record)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                self._log(record)
                self._track(record, busy, since)
                busy, since, self._tokens_since_log = 0.0, 0, 0
                bar.set_postfix(loss=f"{record['loss']:.4f}", align=f"{record['align']:.4f}")
            if cfg.validation.every and self.step % cfg.validation.every == 0:
                self.validate()  # before the checkpoint: a run killed in between redoes this step's videos
                val = self.validation_loss()
                record.update(val)  # in the summary's history (the JSONL record was written above)
                self._track_validation(val)
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                self.save_checkpoint()
            if agreed(self.accelerator, preempted.raised):
                if not (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
                    self.save_checkpoint()
                if acc.is_main_process:
                    print(f"SIGTERM: checkpoint at step {self.step} in {self.checkpoint_root}/; resume with "
                          "resume_from_checkpoint=latest", flush=True)
                break
        preempted.restore()
        bar.close()
        if preempted.raised:
            return {"step": self.step, "history": history, "seconds": time.perf_counter() - start_time,
                    "export": None, "skipped": self._total_skipped(), "problems": list(self.problems),
                    "interrupted": "SIGTERM"}
        elapsed = time.perf_counter() - start_time
        export = self.export() if cfg.export else None
        skipped = self._total_skipped()
        if acc.is_main_process:
            if skipped or self.problems:
                print(f"skipped {skipped} unreadable clip(s) and {len(self.problems)} bad manifest entries "
                      "(see the warnings)")
            where = [f"checkpoints in {self.checkpoint_root}/"] if self.list_checkpoints() else []
            if (self.out / "validation").is_dir():
                where.append(f"validation videos in {self.out / 'validation'}/")
            if export:
                where.append(f"export in {export}/")
            if acc.trackers:
                where.append(f"{', '.join(t.name for t in acc.trackers)} logs in {self.out / 'logs'}/")
            print(f"finetune done: step {self.step}; " + ", ".join(where or [f"log in {self.out / 'logs'}/"]))
        return {"step": self.step, "history": history, "seconds": elapsed, "export": export,
                "skipped": skipped, "problems": list(self.problems), "interrupted": False}


class _Flag:
    """Sets `raised` when `sig` arrives (main thread only), instead of the default action; `restore()`."""

    def __init__(self, sig):
        self.sig, self.raised, self.old = sig, False, None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(sig, self._set)

    def _set(self, signum, frame) -> None:
        self.raised = True

    def restore(self) -> None:
        if self.old is not None:
            signal.signal(self.sig, self.old)


def _close_trackers_after_error(acc) -> None:
    """A run that raised or was interrupted (Ctrl-C): its trackers keep what was logged (tensorboard's
    writer flushed and its thread joined; a wandb run marked failed, as wandb's own exit hook would). The
    process group is left to the process exit: a peer may be inside a collective, and tearing the group
    down waits for queued collectives."""
    for tracker in acc.trackers:  # the main process's; none elsewhere
        try:
            if tracker.name == "wandb":
                tracker.run.finish(exit_code=1)
            else:
                tracker.finish()
        except Exception as err:  # the run's own error is the one to report
            logger.warning("could not close the %s tracker: %s", tracker.name, err)


def finetune(cfg: FinetuneConfig) -> dict:
    """Build a `VideoREPATrainer` for `cfg`, train it, end its trackers and (several processes) its
    process group; returns the summary dict. On an error or Ctrl-C the trackers are closed and the
    exception goes on."""
    trainer = VideoREPATrainer(cfg)
    try:
        summary = trainer.train()
    except BaseException:
        _close_trackers_after_error(trainer.accelerator)
        raise
    # The end of a run, in this order. A 2-process gloo run once aborted at exit, after everything was
    # written, with "terminate called without an active exception" (exit -6). `end_training` closes the
    # trackers (tensorboard's writer thread joined) and then calls `destroy_process_group`, but that only
    # unregisters the group: the models still hold it (DDP's reducer), so its gloo worker threads lived
    # on into interpreter shutdown. A worker that dropped a finished collective's work late (a loaded
    # machine) freed tensors whose Python objects it now owned, needed the GIL, and Python ended the
    # thread inside a C++ destructor: std::terminate. So the trainer goes (models, optimizer and
    # accelerator form a reference cycle: gc.collect), then our last reference to the group: its
    # destructor, run without the GIL, joins the worker threads here, while Python is fully alive.
    dist = torch.distributed
    group = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
    trainer.accelerator.end_training()
    del trainer
    if group is not None:
        gc.collect()
        del group
    return summary
