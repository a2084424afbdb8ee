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
`logs/train_log.jsonl`, `config.yaml`.

Multi-GPU / multi-node: `accelerate launch -m gendistill finetune ...` (DDP, DeepSpeed ZeRO-2, FSDP
as the accelerate config says); on CPU several processes start with `torchrun`.
"""

from __future__ import annotations

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
from gendistill.video_distill.finetune_config import FinetuneConfig, check_config
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
            cpu=cpu, project_config=ProjectConfiguration(project_dir=str(self.out)),
        )
        acc = self.accelerator
        self.device = acc.device
        self.rank, self.world = acc.process_index, acc.num_processes
        self.weight_dtype = _dtype(cfg.mixed_precision)
        set_seed(cfg.seed)  # same on every process: projector / LoRA initial weights agree
        self.nonfinite_steps = self._nonfinite_run = 0  # optimizer steps skipped for NaN/inf: all, in a row
        self.generator = torch.Generator().manual_seed(cfg.seed + 1000003 * self.rank)  # noise, t, latents
        self.step = 0  # optimizer steps done
        self.position = 0  # micro-batches consumed (data position)
        self._bucket_of = self._resumed_data_state = None  # data.buckets: each clip's bucket; a checkpoint's state
        self.skipped: set[str] = set()
        self.problems: list[str] = []
        self._distributed_kind = acc.distributed_type.name if hasattr(acc.distributed_type, "name") else str(acc.distributed_type)

        shared = [self.out] + [Path(p) for p in (cfg.data.cache_dir,) if p and data and cfg.data.cache]
        if cfg.model.tiny:
            shared.append(Path(cfg.model.pretrained).parent)
        check_shared_folders(acc, shared)  # several machines: these must be on a filesystem all of them see
        self._ensure_tiny_models()
        if data:  # the clips are found (or the path refused) before any model loads
            from gendistill.video_distill.data import discover_clips

            self._clips, self.problems = discover_clips(cfg.data.path, cfg.data.root)
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

    def _load_models(self) -> None:
        from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXTransformer3DModel
        from transformers import AutoTokenizer, T5EncoderModel

        cfg, dev, wd = self.cfg, self.device, self.weight_dtype
        src = cfg.model.pretrained
        kw = {"revision": cfg.model.revision} if cfg.model.revision else {}
        vkw = dict(kw, **({"variant": cfg.model.variant} if cfg.model.variant else {}))
        self.tokenizer = load_component(AutoTokenizer, src, "tokenizer", subfolder="tokenizer", **kw)
        self.text_encoder = load_component(T5EncoderModel, src, "text encoder", dev, subfolder="text_encoder", dtype=wd, **vkw)
        self.vae = load_component(AutoencoderKLCogVideoX, src, "VAE", dev, subfolder="vae", dtype=wd, **vkw)
        train_dtype = wd if cfg.training_type == "lora" else torch.float32  # LoRA: frozen base in low precision
        self.transformer = load_component(CogVideoXTransformer3DModel, src, "transformer", dev, subfolder="transformer",
                                 dtype=train_dtype, **vkw)
        self.scheduler = load_component(CogVideoXDPMScheduler, src, "scheduler", subfolder="scheduler", **kw)
        if self.scheduler.config.prediction_type != "v_prediction":
            raise ValueError(f"{src}: the scheduler predicts {self.scheduler.config.prediction_type!r}; "
                             "the CogVideoX finetuning loss needs v_prediction")
        for m in (self.text_encoder, self.vae):
            m.requires_grad_(False).eval().to(dev)
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
            from gendistill.video_distill.teachers import load_teacher

            t = cfg.teacher
            self.teacher = load_teacher(t.name, t.path, num_frames=t.num_frames, frame_start=t.frame_start,
                                        image_size=tuple(t.image_size),
                                        dtype=torch.float32 if t.dtype == "float32" else wd, **dict(t.options)).to(dev)

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
        with acc.split_between_processes(todo) as mine:
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
        return ok, [keys[i] for i in ok], cache

    def _build_data(self) -> None:
        from torch.utils.data import DataLoader

        from gendistill.video_distill.data import VideoClipDataset, bucket_clips, collate_clips

        cfg, clips = self.cfg, self._clips
        cache = keys = shapes = self._bucket_of = None
        if cfg.data.buckets:  # each clip to its bucket; the ones that fit none are skipped (warned, counted)
            buckets = [tuple(b) for b in cfg.data.buckets]
            of, left_out = bucket_clips(clips, buckets, cfg.data.frame_sampling, cfg.data.fps)
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
        """The bucket sampler's state after the micro-batches consumed (`position`); None without buckets."""
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
        optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                      weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps)
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
            if acc.sync_gradients and cfg.optim.max_grad_norm > 0 and not skip:
                acc.clip_grad_norm_(self.params, cfg.optim.max_grad_norm)
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
        self.skipped.update(batch["skipped"])
        return {k: v.item() for k, v in losses.items()}

    def _log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            path = self.out / "logs" / "train_log.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _total_skipped(self) -> int:
        from accelerate.utils import gather_object

        every = gather_object([sorted(self.skipped)]) if self.world > 1 else [sorted(self.skipped)]
        return len({p for paths in every for p in paths})

    def train(self) -> dict:
        """Run until `max_steps` optimizer steps; checkpoint, validate, export. Returns a summary dict."""
        cfg, acc = self.cfg, self.accelerator
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.out / "config.yaml") as tmp:
                tmp.write_text(to_yaml(cfg))
            print(f"finetune ({cfg.training_type}, align {cfg.align.loss}): {len(self.dataset)} clips, "
                  f"{self.n_trainable:,} trainable parameters, {self.world} process(es), output {self.out}/")
        self.student.train()
        history = []
        start_time = time.perf_counter()
        loader = iter(self._make_loader(self.position))
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="finetune", unit="step",
                   disable=not acc.is_local_main_process)
        accum: list[dict] = []
        preempted = _Flag(signal.SIGTERM)  # preemption: checkpoint, then stop (the CLI exits 143)
        while self.step < cfg.max_steps:
            metrics = self.training_step(next(loader))
            accum.append(metrics)
            if not acc.sync_gradients:
                continue
            self.step += 1
            bar.update(1)
            record = {k: sum(m[k] for m in accum) / len(accum) for k in accum[0]}
            record.update(step=self.step, lr=self.lr_scheduler.get_last_lr()[0], skipped=len(self.skipped),
                          skipped_nonfinite=self.nonfinite_steps)
            accum = []
            history.append(record)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                self._log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", align=f"{record['align']:.4f}")
            if cfg.validation.every and self.step % cfg.validation.every == 0:
                self.validate()  # before the checkpoint: a run killed in between redoes this step's videos
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


def finetune(cfg: FinetuneConfig) -> dict:
    """Build a `VideoREPATrainer` for `cfg` and train it; returns the summary dict."""
    return VideoREPATrainer(cfg).train()
