"""The `gendistill finetune` config: nested dataclasses (loaded with `gendistill.config.load_config`)
and `check_config`, which names the first setting that cannot work before anything loads.

Tracking (`report_to`): none | tensorboard | wandb | all, through accelerate's trackers. The default is
decided when the config is built: "tensorboard" when the tensorboard package is installed, else "none",
so a missing default tracker never fails a run; naming a tracker that is not installed is an error.
wandb runs offline with WANDB_MODE=offline (then `wandb sync <output_dir>/logs/wandb/offline-run-*`).

Memory savers (each off by default): `optim.optimizer=adamw8bit` (torchao's 8-bit AdamW states),
`model.layerwise_casting=float8_e4m3fn|float8_e5m2` (frozen weights stored in fp8, computed in the weight
dtype), `model.group_offload=block_level|leaf_level` (VAE and text encoder kept on the CPU, moved to the
device group by group while they run), `teacher.offload=true` (the teacher kept on the CPU, loaded and moved
to the device only for clips whose features are not cached). `check_engine` refuses the ones a distributed
engine cannot run."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

__all__ = [
    "TRAINING_TYPES", "ALIGN_LOSSES", "PRECISIONS", "OPTIM_PRESETS", "ModelConfig", "TeacherConfig", "AlignConfig",
    "LoraConfig", "DataConfig", "OptimConfig", "CheckpointConfig", "ValidationConfig", "FinetuneConfig",
    "REPORT_TO", "OPTIMIZERS", "LAYERWISE_CASTING", "GROUP_OFFLOAD", "TORCHAO_HELP", "default_report_to",
    "tracker_names", "check_config", "check_engine",
]

TRAINING_TYPES = ("sft", "lora")
ALIGN_LOSSES = ("trd", "repa", "none")
PRECISIONS = ("no", "fp16", "bf16")
REPORT_TO = ("none", "tensorboard", "wandb", "all")
OPTIMIZERS = ("adamw", "adamw8bit")
LAYERWISE_CASTING = ("float8_e4m3fn", "float8_e5m2")  # torch dtypes of the stored weights
GROUP_OFFLOAD = ("block_level", "leaf_level")
TORCHAO_HELP = ("optim.optimizer=adamw8bit needs torchao: pip install torchao (or pip install 'gendistill[memory]'); "
                "or set optim.optimizer=adamw")
_TRACKERS = ("tensorboard", "wandb")  # what "all" means: those of them that are installed


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def default_report_to() -> str:
    """The default of `report_to`: "tensorboard" when tensorboard is installed, else "none"."""
    return "tensorboard" if _installed("tensorboard") else "none"


def tracker_names(report_to: str) -> list[str]:
    """accelerate tracker names for a `report_to` value ("all": tensorboard and wandb, those installed)."""
    if report_to == "all":
        return [t for t in _TRACKERS if _installed(t)]
    return [] if report_to == "none" else [report_to]


# -- config ---------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    pretrained: str = "THUDM/CogVideoX-2b"  # hub id or local folder of a CogVideoXPipeline
    revision: Optional[str] = None
    variant: Optional[str] = None
    vae_slicing: bool = True
    vae_tiling: bool = False
    tiny: bool = False  # write the tiny models (gendistill.testing.video) to pretrained / teacher.path if missing
    # float8_e4m3fn | float8_e5m2: frozen weights stored in fp8 and cast up to the weight dtype layer by layer as
    # they run (diffusers' layerwise casting; norms, embeddings, proj_in / proj_out stay): VAE, text encoder,
    # teacher and, with training_type=lora, the transformer's frozen base (full training trains every weight)
    layerwise_casting: Optional[str] = None
    # block_level | leaf_level: the VAE and text encoder live on the CPU and move to the device one block (or
    # layer) at a time while they run (diffusers' group offloading; the trained transformer stays on the device)
    group_offload: Optional[str] = None


@dataclass
class TeacherConfig:
    name: str = "videomaev2"  # a gendistill.video_distill.teachers.TEACHERS entry
    path: Optional[str] = None  # checkpoint file, local folder or hub id (None: the entry's default)
    num_frames: Optional[int] = 48
    frame_start: int = 1
    image_size: List[int] = field(default_factory=lambda: [160, 240])
    dtype: Optional[str] = None  # null: the weights' dtype (bf16 / fp16 under mixed precision); float32 (VideoREPA's)
    options: Dict[str, Any] = field(default_factory=dict)  # more load_teacher options (pos_embed, final_norm, ...)
    # keep the teacher on the CPU, loaded on first use and moved to the device only while it encodes clips
    # whose features are not cached (data.cache): with every feature cached it is never loaded
    offload: bool = False


@dataclass
class AlignConfig:
    loss: str = "trd"  # trd (VideoREPA), repa (cosine, REPA), none (plain finetuning)
    align_layer: int = 18  # 1-based transformer block
    proj_coeff: float = 0.5
    margin: float = 0.1
    reduction: str = "joint"  # joint | paper
    chunk_size: Optional[int] = None
    projector_dim: int = 2048
    downsampler: str = "conv"  # conv (learnable, VideoREPA) | area | bilinear | nearest
    kernel_size: int = 3
    drop_first_frame: bool = True
    temporal: str = "linear"
    heads: Optional[str] = None  # start the projector / aligner from ours or a released VideoREPA transformer (heads.py)


@dataclass
class LoraConfig:
    rank: int = 128
    alpha: float = 64.0
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class DataConfig:
    path: str = "data/videos"  # folder of videos with .txt captions, or a .csv / .json / .jsonl manifest
    root: Optional[str] = None  # base of relative manifest paths (default: the manifest's folder)
    num_frames: int = 49
    height: int = 480
    width: int = 720
    frame_sampling: str = "uniform"  # uniform (spread) | first | stride (VideoREPA's, short clips padded) | fps
    fps: Optional[float] = None  # frame_sampling=fps: frames taken at this rate from frame 0 (nearest source frames)
    # [[frames, height, width], ...]: each clip goes to the bucket nearest its aspect ratio, then its length
    # (a clip shorter than every bucket is skipped); a batch comes from one bucket. null: every clip at
    # num_frames x height x width
    buckets: Optional[List[List[int]]] = None
    shuffle: bool = True
    num_workers: int = 0
    cache: bool = False  # precompute VAE latents, prompt embeddings and teacher tokens
    cache_dir: Optional[str] = None  # default: output_dir/cache


# what VideoREPA's runs used: the DeepSpeed config in use (finetune/configs/zero2.yaml) sets AdamW and
# WarmupDecayLR with only lr and weight decay filled in by accelerate, so AdamW keeps DeepSpeed's betas
# (0.9, 0.999) and the rate warms up logarithmically, then decays linearly to 0 ("as_run"); the training
# scripts' own flags, (0.9, 0.95) and constant_with_warmup, which the DeepSpeed config overrides ("scripts")
OPTIM_PRESETS = {
    "as_run": {"betas": [0.9, 0.999], "lr_scheduler": "warmup_decay_log"},
    "scripts": {"betas": [0.9, 0.95], "lr_scheduler": "constant_with_warmup"},
}


@dataclass
class OptimConfig:
    lr: float = 2e-6
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 1e-4
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant_with_warmup"  # warmup_decay_log (DeepSpeed's) or a diffusers.optimization name
    warmup_steps: int = 100
    num_cycles: int = 1
    power: float = 1.0
    preset: Optional[str] = None  # OPTIM_PRESETS: sets betas and lr_scheduler (overriding theirs)
    optimizer: str = "adamw"  # adamw (torch) | adamw8bit (torchao's AdamW8bit: 8-bit states, pip install torchao)

    def __post_init__(self):
        if self.preset is not None:
            if self.preset not in OPTIM_PRESETS:
                raise ValueError(f"optim.preset must be one of {sorted(OPTIM_PRESETS)} or null, got {self.preset!r}")
            for key, value in OPTIM_PRESETS[self.preset].items():
                setattr(self, key, list(value) if isinstance(value, list) else value)


@dataclass
class CheckpointConfig:
    every: int = 800
    keep: int = 2


@dataclass
class ValidationConfig:
    every: int = 800  # 0: never (and not at the end)
    prompts: List[str] = field(default_factory=list)
    num_frames: Optional[int] = None  # default: data.num_frames
    height: Optional[int] = None
    width: Optional[int] = None
    num_inference_steps: int = 50
    guidance_scale: float = 6.0
    fps: float = 8.0
    seed: int = 42  # prompt K generates with seed + K; held-out clip K draws its noise and timestep from seed + K
    # held-out validation loss (val/loss_diffusion, val/loss_align) every `every` steps: a folder or manifest
    # of clips (as data.path, read at data.num_frames x height x width); null: none
    data: Optional[str] = None
    loss_clips: int = 8  # the first N clips of validation.data


@dataclass
class FinetuneConfig:
    output_dir: str = "outputs/finetune"
    max_steps: int = 1000
    training_type: str = "sft"  # sft (full) | lora
    batch_size: int = 4  # per process
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "bf16"  # no | fp16 | bf16
    gradient_checkpointing: bool = True
    seed: int = 42
    resume_from_checkpoint: Optional[str] = None  # "latest" or a checkpoint folder
    log_every: int = 1
    export: bool = True
    max_nonfinite_steps: int = 10  # an optimizer step with NaN/inf loss or gradients is skipped; this many in a row stop
    # none | tensorboard (logs/<tracker_project>/) | wandb | all; default: tensorboard if installed, else none
    report_to: str = field(default_factory=default_report_to)
    tracker_project: str = "videorepa"  # tensorboard: the run folder under logs/; wandb: the project
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def __post_init__(self):
        if self.mixed_precision in ("False", "false"):  # YAML 1.1 reads a bare `no` (mixed_precision=no) as false
            self.mixed_precision = "no"


def _scheduler_names() -> tuple[str, ...]:
    from diffusers.optimization import SchedulerType

    from gendistill.video_distill.lr_schedules import SCHEDULERS_OF_OURS

    return (*SCHEDULERS_OF_OURS, *(t.value for t in SchedulerType))


def check_config(cfg: FinetuneConfig) -> None:
    """Raise ValueError naming the first setting that cannot work."""
    checks = [
        (cfg.training_type in TRAINING_TYPES, f"training_type must be one of {TRAINING_TYPES}, got {cfg.training_type!r}"),
        (cfg.align.loss in ALIGN_LOSSES, f"align.loss must be one of {ALIGN_LOSSES}, got {cfg.align.loss!r}"),
        (cfg.mixed_precision in PRECISIONS, f"mixed_precision must be one of {PRECISIONS}, got {cfg.mixed_precision!r}"),
        (cfg.max_steps >= 1, f"max_steps must be >= 1, got {cfg.max_steps}"),
        (cfg.max_nonfinite_steps >= 1, f"max_nonfinite_steps must be >= 1, got {cfg.max_nonfinite_steps}"),
        (cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1"),
        (cfg.align.align_layer >= 1, f"align.align_layer is 1-based, got {cfg.align.align_layer}"),
        ((cfg.data.num_frames - 1) % 4 == 0, f"data.num_frames must be 4k+1 for CogVideoX's VAE (49, 33, 9...), "
                                             f"got {cfg.data.num_frames}"),
        (len(cfg.optim.betas) == 2, f"optim.betas must be two numbers, got {cfg.optim.betas}"),
        (cfg.optim.lr_scheduler in _scheduler_names(), f"optim.lr_scheduler must be one of "
                                                      f"{_scheduler_names()}, got {cfg.optim.lr_scheduler!r}"),
        (cfg.teacher.dtype in (None, "float32"), f"teacher.dtype must be null (the weights' dtype) or float32, "
                                                 f"got {cfg.teacher.dtype!r}"),
        (len(cfg.teacher.image_size) == 2, f"teacher.image_size must be [height, width], got {cfg.teacher.image_size}"),
        (cfg.checkpoint.keep >= 1, f"checkpoint.keep must be >= 1, got {cfg.checkpoint.keep}"),
        (cfg.validation.loss_clips >= 1, f"validation.loss_clips must be >= 1, got {cfg.validation.loss_clips}"),
        (cfg.report_to in REPORT_TO, f"report_to must be one of {REPORT_TO}, got {cfg.report_to!r}"),
        (cfg.optim.optimizer in OPTIMIZERS, f"optim.optimizer must be one of {OPTIMIZERS}, got {cfg.optim.optimizer!r}"),
        (cfg.model.layerwise_casting in (None, *LAYERWISE_CASTING), f"model.layerwise_casting must be null or one of "
                                                                    f"{LAYERWISE_CASTING}, got {cfg.model.layerwise_casting!r}"),
        (cfg.model.group_offload in (None, *GROUP_OFFLOAD), f"model.group_offload must be null or one of "
                                                            f"{GROUP_OFFLOAD}, got {cfg.model.group_offload!r}"),
        (isinstance(cfg.teacher.offload, bool), f"teacher.offload must be true or false, got {cfg.teacher.offload!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    for name in _TRACKERS:
        if cfg.report_to == name and not _installed(name):
            raise ValueError(f"report_to={name} but {name} is not installed: pip install {name} "
                             "(or report_to=none)")
    if cfg.optim.optimizer == "adamw8bit" and not _installed("torchao"):
        raise ValueError(TORCHAO_HELP)
    _check_data(cfg)


def check_engine(cfg: FinetuneConfig, engine: str) -> None:
    """Raise ValueError naming the memory saver that the distributed `engine` (accelerate's distributed type
    name: NO, MULTI_GPU, MULTI_CPU, DEEPSPEED, FSDP, ...) cannot run, before any model loads."""
    if engine not in ("DEEPSPEED", "FSDP"):
        return
    name = "DeepSpeed" if engine == "DEEPSPEED" else "FSDP"
    if cfg.optim.optimizer == "adamw8bit":
        raise ValueError(f"optim.optimizer=adamw8bit is not supported under {name}, which shards and steps the "
                         "optimizer itself; use optim.optimizer=adamw (DeepSpeed: or its own optimizer settings), or "
                         "train with DDP")
    if cfg.model.layerwise_casting and cfg.training_type == "lora":
        raise ValueError(f"model.layerwise_casting={cfg.model.layerwise_casting} with training_type=lora is not "
                         f"supported under {name}: it re-casts or flattens the transformer's weights into one dtype; "
                         "set model.layerwise_casting=null or train with DDP")


def _check_data(cfg: FinetuneConfig) -> None:
    """The `data.frame_sampling`, `data.fps` and `data.buckets` checks of `check_config`."""
    from gendistill.video_distill.data import SAMPLING_MODES

    d = cfg.data
    if d.frame_sampling not in SAMPLING_MODES:
        raise ValueError(f"data.frame_sampling must be one of {SAMPLING_MODES}, got {d.frame_sampling!r}")
    if d.frame_sampling == "fps" and not (isinstance(d.fps, (int, float)) and d.fps > 0):
        raise ValueError(f"data.fps must be a frame rate > 0 with data.frame_sampling=fps, got {d.fps!r}")
    if d.fps is not None and d.frame_sampling != "fps":
        raise ValueError(f"data.fps={d.fps} is set but data.frame_sampling is {d.frame_sampling!r}; set "
                         "data.frame_sampling=fps to sample at data.fps, or data.fps=null")
    if d.buckets is None:
        return
    if not d.buckets:
        raise ValueError("data.buckets is empty; give [[frames, height, width], ...] or null")
    t = cfg.teacher
    teacher_frames = t.frame_start + t.num_frames if cfg.align.loss != "none" and t.num_frames else 0
    for i, bucket in enumerate(d.buckets):
        b = list(bucket)
        if len(b) != 3 or not all(isinstance(v, int) and v > 0 for v in b):
            raise ValueError(f"data.buckets[{i}] must be [frames, height, width], positive integers, got {b}")
        if (b[0] - 1) % 4:
            raise ValueError(f"data.buckets[{i}]: frames must be 4k+1 for CogVideoX's VAE (49, 33, 9...), got {b[0]}")
        if b[0] < teacher_frames:
            raise ValueError(f"data.buckets[{i}] has {b[0]} frames; the teacher reads frames {t.frame_start}.."
                             f"{teacher_frames - 1} (teacher.frame_start, teacher.num_frames)")
        if b in [list(x) for x in d.buckets[:i]]:
            raise ValueError(f"data.buckets[{i}] repeats {b}")
