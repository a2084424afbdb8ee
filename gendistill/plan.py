"""`gendistill plan`: will a config fit on a GPU, and how long will a step take? Answered on a CPU,
without weights.

Every model of the config is built at full size from its architecture configs (`configs/models/`,
`random:` sources) under fake tensors (`FakeTensorMode`: shapes and dtypes, no data, no memory),
and one step runs through the project's own code:

- finetune: `VideoREPATrainer.step_tensors` (VAE and text encoding, teacher, transformer with the
  hook at `align_layer`, projector, grid aligner, TRD / REPA, backward, clipping, AdamW), with the
  config's precision, gradient checkpointing, LoRA or full training, and the memory savers: fp8 weights
  (`model.layerwise_casting`) as built (the weights its hooks cast during the step are new tensors, so
  the split counts them as activations: the total is right, not the label); the weights of models kept
  on the CPU (`model.group_offload`: VAE and text encoder; `teacher.offload`) taken out of the device's
  peak (`offloaded_bytes`; the peak is taken to fall outside their forward passes, as in the
  transformer's backward); 8-bit AdamW (`optim.optimizer=adamw8bit`) stepped as AdamW under fake
  tensors, its state then counted as torchao stores it (`_adamw8bit_state_bytes`);
- edit: the guidance loss of one step (`Guidance.loss`: VAE encoding, every denoiser pass with CFG
  and refinement, backward through the VAE) on a render-sized image, plus the scene's Gaussians,
  their gradients and Adam state (the rasterizer's own buffers are not counted).

`MemTracker` splits the peak into parameters, gradients, optimizer state and activations;
`FlopCounterMode` counts FLOPs, and s/step per GPU is FLOPs / (peak dense bf16 FLOP/s x utilisation)
plus a fixed cost per step, both calibrated on H200 measurements (`UTILISATION`).

Accuracy against one H200 (random weights, the real commands, batch 1): romap_sd3 18.1 vs 18.2 GiB,
sds_sd21 4.0 vs 4.3, ip2p 3.7 vs 4.1, videorepa_2b_sft 38.9 vs 43.4, videorepa_5b_lora 30.5 vs 31.0,
repa_baseline 30.4 vs 30.9 (README). Tiny configs on CPU are checked against real steps within 25%
(tests/test_plan.py).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from gendistill.core.architectures import RANDOM_PREFIX, arch_folder, is_random

__all__ = ["GPUS", "UTILISATION", "plan_config", "measure_step", "format_plan", "add_plan_parser", "run_plan"]

# name -> (memory GiB, dense bf16 tensor TFLOP/s from the vendor's datasheet)
GPUS = {
    "A100-80GB": (80, 312.0),
    "H100": (80, 989.0),
    "H200": (141, 989.0),
    "L40S": (48, 362.0),
    "RTX4090": (24, 165.0),
}
# s/step = FLOPs / (peak FLOP/s x utilisation) + a fixed cost per step, per kind, calibrated on the H200
# measurements (tools/measurements/full_size_h200.json): a finetune step of VideoREPA-2B reached 22% of
# peak (VAE encoding, T5 and the teacher every step included); an edit step at 512x512 costs ~0.06 s
# outside the diffusion model (rendering, optimizer, Python) whatever the model.
UTILISATION = {"finetune": (0.22, 0.0), "edit": (0.35, 0.06)}


def _random(source: str | None) -> str | None:
    """A `random:` source for a hub id or folder that has architecture configs."""
    if source is None or is_random(source):
        return source
    arch_folder(source)  # a clear error naming the file to add
    return RANDOM_PREFIX + str(source)


# teachers loaded from a checkpoint file: the architecture of the checkpoint the shipped configs name
TEACHER_ARCHS = {"videomaev2": "OpenGVLab/VideoMAEv2-Base", "vjepa": "facebook/vjepa-vitl16",
                 "ominimae": "facebook/omnimae-vitb16", "omnimae": "facebook/omnimae-vitb16"}


def _teacher_source(teacher) -> str:
    from gendistill.video_distill.teachers import TEACHERS

    path = teacher.path or getattr(TEACHERS.get_entry(teacher.name), "default_hub_id", None)
    try:
        return _random(path)
    except FileNotFoundError:
        if teacher.name in TEACHER_ARCHS and path is not None and Path(str(path)).suffix in (".pth", ".pt", ".bin", ".tar", ".torch"):
            return RANDOM_PREFIX + TEACHER_ARCHS[teacher.name]
        raise


def _kind(path: str | Path) -> str:
    from omegaconf import OmegaConf

    keys = set(OmegaConf.load(path).keys())
    if "guidance" in keys:
        return "edit"
    if keys & {"model", "teacher", "align", "training_type"}:
        return "finetune"
    raise ValueError(f"{path}: neither an edit config (no `guidance`) nor a finetune config (no `model`)")


def _components(named: dict) -> dict:
    """{name: {"params", "trainable", "dtype"}}; dtype: the one holding most of the parameters."""
    out = {}
    for name, module in named.items():
        if module is None:
            continue
        params = list(module.parameters())
        by_dtype: dict[str, int] = {}
        for p in params:
            key = str(p.dtype).replace("torch.", "")
            by_dtype[key] = by_dtype.get(key, 0) + p.numel()
        out[name] = {"params": sum(p.numel() for p in params),
                     "trainable": sum(p.numel() for p in params if p.requires_grad),
                     "dtype": max(by_dtype, key=by_dtype.get) if by_dtype else "none"}
    return out


def _adamw8bit_state_bytes(params) -> tuple[int, int]:
    """(AdamW's state bytes, torchao AdamW8bit's) for `params`: AdamW keeps two moments in the parameter's
    dtype; AdamW8bit quantizes a tensor of >= 4096 values (a multiple of its 256-value blocks) to one byte a
    value plus a float32 scale a block per moment, and keeps the others like AdamW."""
    full = eight = 0
    for p in params:
        n, size = p.numel(), p.element_size()
        full += 2 * n * size
        eight += 2 * (n + 4 * (n // 256)) if n >= 4096 and n % 256 == 0 else 2 * n * size
    return full, eight


class _fake_mode:
    """FakeTensorMode as a GPU run would see it, on the CPU:

    - attention without a mask goes through the flash-attention op (what CUDA picks; it keeps only
      the log-sum-exp for backward), not the CPU math path that materialises every attention matrix;
    - `module.to(...)` replaces parameters instead of swapping them (PyTorch swaps fake parameters,
      which fails for tied weights such as T5's embeddings), and is a no-op onto the same device;
    - `torch.equal` of fake tensors is True (diffusers' prompt encoders use it only to warn about
      truncated prompts; fake tensors have no values to compare).
    """

    def __enter__(self):
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.sdpa = sdpa = torch.nn.functional.scaled_dot_product_attention

        def flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
            if attn_mask is not None or kwargs.get("enable_gqa") or query.shape[-1] != value.shape[-1]:
                return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, **kwargs)
            return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                                       False, scale=scale)[0]

        torch.nn.functional.scaled_dot_product_attention = flash_sdpa
        self.to = torch.nn.Module.to

        def fake_to(module, *args, **kwargs):
            device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
            tensors = [*module.parameters(), *module.buffers()]
            if dtype is None and (device is None or all(t.device == torch.device(device) for t in tensors)):
                return module
            done = {}  # tied parameters (T5's embeddings) stay tied
            for m in module.modules():  # replace (not swap) each parameter and buffer
                for k, p in m._parameters.items():
                    if p is not None and id(p) not in done:
                        new = p.detach().to(device=device, dtype=dtype if p.is_floating_point() else None)
                        done[id(p)] = torch.nn.Parameter(new, requires_grad=p.requires_grad)
                    if p is not None:
                        m._parameters[k] = done[id(p)]
                for k, b in m._buffers.items():
                    if b is not None:
                        m._buffers[k] = b.to(device=device, dtype=dtype if b.is_floating_point() else None)
            return module

        torch.nn.Module.to = fake_to
        from torch._subclasses.fake_tensor import is_fake

        self.equal = equal = torch.equal
        torch.equal = lambda a, b: True if is_fake(a) or is_fake(b) else equal(a, b)
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        return self.mode.__enter__()

    def __exit__(self, *exc):
        torch.nn.Module.to = self.to
        torch.nn.functional.scaled_dot_product_attention = self.sdpa
        torch.equal = self.equal
        return self.mode.__exit__(*exc)


class _NoModules:
    """Stands in for the module trackers of MemTracker and FlopCounterMode: no module hooks, everything
    counted under "Global". MemTracker's per-module snapshots were ~70% of a plan's time, and
    FlopCounterMode's backward hooks kept gradient-checkpointing recomputations alive, which MemTracker
    then counted as activations (the 2B finetune's peak read 64 GiB). MemTracker still asks "are we in
    backward?", which sorts new tensors into activations and temporaries."""

    parents = ("Global",)

    @property
    def is_bw(self):
        return torch._C._current_graph_task_id() != -1

    def register_user_hooks(self, *hooks):
        pass

    def clear_user_hooks(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _create_state(optimizer) -> None:
    """Give `optimizer` its state (Adam creates it on its first step), so that the measured step is a
    steady-state one: its state is there during the forward and backward passes of every later step."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if all(p in optimizer.state and optimizer.state[p] for p in params):
        return
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_step(step, modules, optimizers=()) -> dict:
    """Run `step()` once under `MemTracker` and `FlopCounterMode`, with real or fake tensors, as a
    steady-state step (each optimizer's state created first).

    Returns {"device", "peak_memory_bytes", "memory": {category: bytes at the peak}, "flops_per_step"}.
    """
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.utils.flop_counter import FlopCounterMode

    class Tracker(MemTracker):  # totals per device only: no per-module statistics
        def _update_peak_stats(self, peak_state):  # the base class also walks every module's stats on every op
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = dict(snap)

    for optimizer in optimizers:
        _create_state(optimizer)
    tracker = Tracker()
    tracker._mod_tracker = _NoModules()
    tracker.track_external(*modules, *optimizers)
    from torch.distributed._tools.mem_tracker import _MemRefType

    def grad_seen(grad):
        tracker._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

    handles = []
    for module in modules:
        for p in (module.parameters() if isinstance(module, torch.nn.Module) else [module]):
            if p.requires_grad:
                handles += [p.register_hook(grad_seen), p.register_post_accumulate_grad_hook(lambda q: grad_seen(q.grad))]
    flops = FlopCounterMode(display=False)
    flops.mod_tracker = _NoModules()
    with tracker, flops:
        step()
    for h in handles:
        h.remove()
    peak = tracker.get_tracker_snapshot("peak")
    device, split = max(peak.items(), key=lambda kv: kv[1]["Total"])
    names = {"PARAM": "parameters", "BUFFER": "buffers", "GRAD": "gradients", "OPT": "optimizer_state",
             "ACT": "activations", "TEMP": "temporaries", "OTH": "other"}
    memory = {names.get(str(k).split(".")[-1], str(k)): int(v) for k, v in split.items() if str(k) != "Total"}
    return {"device": str(device), "peak_memory_bytes": int(split["Total"]), "memory": memory,
            "flops_per_step": int(flops.get_total_flops())}


def _plan_finetune(cfg) -> dict:
    from gendistill.video_distill.trainer import VideoREPATrainer

    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=_random(cfg.model.pretrained),
                                                             tiny=False))
    if cfg.align.loss != "none":
        cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, path=_teacher_source(cfg.teacher)))
    optimizer_kind = cfg.optim.optimizer  # adamw8bit: AdamW under fake tensors (torchao's states do not fake), recounted
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, optimizer="adamw"))
    d = cfg.data
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a plan is its own run (precision, devices)
    try:
        with _fake_mode():
            trainer = VideoREPATrainer(cfg, data=False)
            trainer.student.train()  # as `train()` does
            batch = {"video": torch.rand(cfg.batch_size, d.num_frames, 3, d.height, d.width),
                     "caption": ["a ball bounces on the grass"] * cfg.batch_size, "skipped": []}
            teacher = getattr(trainer.teacher, "module", trainer.teacher)  # teacher.offload: the loaded teacher
            on_cpu = ([trainer.text_encoder, trainer.vae] if cfg.model.group_offload else []) + \
                ([teacher] if cfg.teacher.offload and teacher is not None else [])
            modules = [m for m in (trainer.student, trainer.text_encoder, trainer.vae, teacher) if m is not None]
            result = measure_step(lambda: trainer.step_tensors(batch), modules, [trainer.optimizer])
    finally:  # and leaves no state behind for a real run in the same process
        AcceleratorState._reset_state(reset_partial_state=True)
    if optimizer_kind == "adamw8bit":
        full, eight = _adamw8bit_state_bytes(trainer.params)
        saved = min(full - eight, result["memory"].get("optimizer_state", 0))
        result["memory"]["optimizer_state"] = result["memory"].get("optimizer_state", 0) - saved
        result["peak_memory_bytes"] -= saved
    # weights kept on the CPU: tracked like the others (an untracked weight that an op views is counted as an
    # activation), then taken out of the device's peak
    offloaded = {id(p): p.numel() * p.element_size() for m in on_cpu for p in m.parameters()}
    result["offloaded_bytes"] = off = min(sum(offloaded.values()), result["memory"].get("parameters", 0))
    if off:
        result["memory"]["parameters"] -= off
        result["peak_memory_bytes"] -= off
    result["models"] = _components({"transformer": trainer.transformer, "text_encoder": trainer.text_encoder,
                                    "vae": trainer.vae, "teacher": teacher,
                                    "projector": getattr(trainer.student, "projector", None),
                                    "aligner": getattr(trainer.student, "aligner", None)})
    result["input"] = f"{cfg.batch_size} x {d.num_frames} x {d.height} x {d.width}"
    result["switches"] = {"gradient_checkpointing": cfg.gradient_checkpointing, "training_type": cfg.training_type,
                          "mixed_precision": cfg.mixed_precision, "batch_size": cfg.batch_size,
                          "optimizer": optimizer_kind, "layerwise_casting": cfg.model.layerwise_casting,
                          "group_offload": cfg.model.group_offload, "teacher_offload": cfg.teacher.offload}
    return result


def _scene_size(path) -> int:
    if path is None or not Path(path).is_file():
        return 0
    from plyfile import PlyData

    return int(PlyData.read(str(path))["vertex"].count)


def _plan_edit(cfg) -> dict:
    from gendistill.core.architectures import random_pipeline
    from gendistill.core.guidance import load_guidance
    from gendistill.core.runtime import as_dtype
    from gendistill.splat_edit.edit_inputs import guidance_options

    g = cfg.guidance
    B, H, W = cfg.batch_size, cfg.cameras.height, cfg.cameras.width
    n = _scene_size(cfg.scene)
    with _fake_mode():
        pipe = random_pipeline(_random(g.model), dtype=as_dtype(g.dtype), **dict(g.pipeline_kwargs))
    # the guidance's own set-up (noise schedules) on real tensors, around the fake models
    guidance = load_guidance(pipe, **guidance_options(g))
    with _fake_mode():
        # the scene: means, quats, scales, opacities, SH (degree 3) in float32, with gradients and Adam state
        gaussians = torch.nn.Parameter(torch.zeros(n, 3 + 4 + 3 + 1 + 48))
        optimizer = torch.optim.Adam([gaussians], lr=1e-3)
        images = torch.rand(B, 3, H, W, requires_grad=True)
        extra = {"image_cond": images.detach()} if guidance.needs_image_condition else {}

        def step():
            loss = guidance.loss(images, prompt=cfg.prompt or "a photo", negative_prompt=g.negative_prompt,
                                 mask=torch.ones(B, 1, H, W), **extra)
            (loss + gaussians.sum() * 0).backward()
            optimizer.step()

        named = {k: getattr(pipe, k, None) for k in ("transformer", "unet", "vae", "text_encoder", "text_encoder_2",
                                                      "text_encoder_3")}
        result = measure_step(step, [m for m in named.values() if m is not None] + [gaussians], [optimizer])
    result["models"] = _components({k: v for k, v in named.items()
                                    if isinstance(v, torch.nn.Module)})
    result["models"]["gaussians"] = {"params": gaussians.numel(), "trainable": gaussians.numel(), "dtype": "float32"}
    result["input"] = f"{B} x 3 x {H} x {W}, {n:,} Gaussians"
    result["switches"] = {"dtype": g.dtype, "cpu_offload": g.cpu_offload,
                          "text_encoder_3": "off" if "text_encoder_3" in g.pipeline_kwargs else "on"}
    return result


def load_plan_config(config: str | Path, overrides=()) -> tuple[str, object]:
    """("edit" | "finetune", the merged and checked config) of `config` + `key=value` overrides."""
    from gendistill.config import load_config

    kind = _kind(config)
    if kind == "edit":
        from gendistill.splat_edit.edit_config import EditConfig

        return kind, load_config(EditConfig, config, [*overrides, *_edit_placeholders(overrides)])
    from gendistill.video_distill.finetune_config import FinetuneConfig, check_config

    cfg = load_config(FinetuneConfig, config, overrides)
    check_config(cfg)
    return kind, cfg


def plan_config(config: str | Path, overrides=()) -> dict:
    """The plan of one step of `config` (+ `key=value` overrides) at full size, as a JSON-able dict."""
    start = time.perf_counter()
    kind, cfg = load_plan_config(config, overrides)
    result = _plan_edit(cfg) if kind == "edit" else _plan_finetune(cfg)
    result.update(config=str(config), kind=kind, seconds=round(time.perf_counter() - start, 1))
    util, overhead = UTILISATION[kind]
    result["gpus"] = {name: {"memory_gib": mem, "fits": result["peak_memory_bytes"] <= mem * 2**30 * 0.95,
                             "s_per_step": round(result["flops_per_step"] / (tflops * 1e12 * util) + overhead, 3)}
                      for name, (mem, tflops) in GPUS.items()}
    return result


def _edit_placeholders(overrides) -> list[str]:
    """An edit config needs scene / part / edit_prompt / out to load; a plan does not read them."""
    given = {o.split("=", 1)[0] for o in overrides}
    defaults = {"scene": "none.ply", "part": "part", "edit_prompt": "an edit", "out": "outputs/plan"}
    return [f"{k}={v}" for k, v in defaults.items() if k not in given]


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def suggestions(result: dict, memory_gib: float) -> list[str]:
    """Config switches that lower the peak, for a plan that does not fit in `memory_gib`."""
    if result["peak_memory_bytes"] <= memory_gib * 2**30 * 0.95:
        return []
    s, tips = result["switches"], []
    if result["kind"] == "finetune":
        if not s["gradient_checkpointing"]:
            tips.append("gradient_checkpointing=true")
        if s["training_type"] != "lora":
            tips.append("training_type=lora (the base model frozen in half precision)")
        if s["batch_size"] > 1:
            tips.append("batch_size=1 with gradient_accumulation_steps=" + str(s["batch_size"]))
        if s.get("optimizer") == "adamw":
            tips.append("optim.optimizer=adamw8bit (8-bit optimizer states, pip install torchao)")
        if not s.get("layerwise_casting", True):
            tips.append("model.layerwise_casting=float8_e4m3fn (frozen weights stored in fp8)")
        if not s.get("group_offload", True):
            tips.append("model.group_offload=block_level (VAE and text encoder kept on the CPU)")
        if s.get("teacher_offload") is False:
            tips.append("teacher.offload=true with data.cache=true (the teacher kept on the CPU)")
        tips.append("DeepSpeed ZeRO-2 across GPUs (configs/accelerate/deepspeed_zero2.yaml) to shard optimizer state")
    else:
        if s["text_encoder_3"] == "on":
            tips.append("guidance.pipeline_kwargs={text_encoder_3: null, tokenizer_3: null} (no T5)")
        if s["cpu_offload"] is None:
            tips.append("guidance.cpu_offload=model")
    return tips


def format_plan(result: dict, gpu: str | None = None, gpu_memory: float | None = None) -> str:
    lines = [f"plan: {result['config']} ({result['kind']}), one step of {result['input']}, "
             f"{result['seconds']} s to plan", "",
             "| component | parameters | trainable | dtype |", "| --- | ---: | ---: | --- |"]
    for name, m in result["models"].items():
        lines.append(f"| {name} | {m['params']:,} | {m['trainable']:,} | {m['dtype']} |")
    lines += ["", f"peak memory: {_size(result['peak_memory_bytes'])} = "
              + ", ".join(f"{k} {_size(v)}" for k, v in result["memory"].items() if v)
              + (f" (and {_size(result['offloaded_bytes'])} of weights kept on the CPU)"
                 if result.get("offloaded_bytes") else ""),
              f"FLOPs per step: {result['flops_per_step']:.3e}", "",
              f"| GPU | memory GiB | fits | s/step (estimate: {int(UTILISATION[result['kind']][0] * 100)}% of peak "
              f"bf16 FLOP/s + {UTILISATION[result['kind']][1]} s) |", "| --- | ---: | --- | ---: |"]
    for name, g in result["gpus"].items():
        lines.append(f"| {name} | {g['memory_gib']} | {'yes' if g['fits'] else 'no'} | {g['s_per_step']} |")
    if gpu or gpu_memory:
        memory = gpu_memory if gpu_memory else GPUS[gpu][0]
        label = gpu or f"{memory:g} GiB"
        fits = result["peak_memory_bytes"] <= memory * 2**30 * 0.95
        lines += ["", f"{label}: {'fits' if fits else 'does not fit'} "
                      f"({_size(result['peak_memory_bytes'])} of {memory:g} GiB, 5% kept free)"]
        tips = suggestions(result, memory)
        if tips:
            lines.append("to fit, try: " + "; ".join(tips))
    return "\n".join(lines)


def add_plan_parser(subparsers):
    p = subparsers.add_parser(
        "plan", help="memory, FLOPs and time of one full-size step of a config, on a CPU, without weights",
        description="Build every model of the config at full size from configs/models/ under fake tensors and run "
                    "one step through the command's own code; print parameters, peak memory (parameters, "
                    "gradients, optimizer state, activations), FLOPs and s/step per GPU.")
    p.add_argument("--config", required=True, help="a YAML config of configs/splat_edit or configs/video_distill")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--gpu", choices=sorted(GPUS), help="say whether it fits on this GPU, and what would make it fit")
    p.add_argument("--gpu-memory", type=float, help="the same for a GPU with this many GiB")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(run=run_plan, load_config=lambda args: load_plan_config(args.config, args.overrides)[1])
    return p


def run_plan(args) -> None:
    """`gendistill plan` (and `edit` / `finetune --dry-run`): print the plan of args.config + args.overrides."""
    result = plan_config(args.config, args.overrides)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_plan(result, args.gpu, args.gpu_memory))
