"""Memory savers of `gendistill finetune`, each off and on: peak memory and step time on a small model.

    python tools/bench_memory_savers.py                  # every row, 6 steps each (the first not timed)
    python tools/bench_memory_savers.py --rows plain,adamw8bit --steps 6

The model is the tiny CogVideoX of `gendistill.testing.video` made wider and deeper (transformer 6 blocks of
width 512, ~24M parameters; T5 encoder 6 layers of width 512; VAE of width 64; VideoMAE teacher 6 layers of
width 384), written once under --work, trained on assets/clips at 9 x 64 x 64 in float32.

Every row runs in a fresh subprocess (OMP_WAIT_POLICY=PASSIVE unless set). Columns: "frozen" and "optim"
are the bytes of the frozen weights held (VAE, T5, teacher when loaded, the transformer's base in LoRA) and of
the optimizer state after the steps, counted tensor by tensor (8-bit states: their codes and scales);
"tensors" is the peak of live tensor bytes in one more, steady-state step on the busiest device, tracked by
`gendistill.plan.measure_step` (PyTorch's MemTracker: what `gendistill plan` counts; allocator-independent);
"setup RSS" is the resident set size once the trainer is built (models, optimizer; the cached rows: cache
complete), glibc's freed memory handed back (malloc_trim); "peak RSS" is the highest RSS during the timed
steps (VmHWM, reset after setup through /proc/self/clear_refs); with CUDA also `torch.cuda.memory_allocated`
after setup and `max_memory_allocated` during the steps. s/step: the median of the steps after the first
(which creates the optimizer state); on a shared machine times vary by tens of percent from run to run.

Reading the RSS columns on the CPU: `from_pretrained` maps the float32 safetensors files, so frozen weights
are clean file pages; fp8 casting reads every page and adds the fp8 copies, and the file stays mapped while
an uncast weight (norms, embeddings) points into it, so layerwise casting raises CPU RSS (its saving shows in
"frozen" and "tensors", and on a GPU, where weights are copied to the device). The peak RSS is mostly set by
the first step's encoding, before any optimizer state exists, and freed heap memory is reused rather than
returned, so smaller optimizer states barely move it. Group offloading moves nothing on the CPU (its offload
device is the CPU): its rows show that it runs and what its hooks cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "video_distill" / "tiny_cpu.yaml"
MODELS_VERSION = "v1"
SIZE = 64  # clip height and width

# name -> (what it shows, overrides)
ROWS = {
    "plain": ("full finetune, AdamW", []),
    "adamw8bit": ("full finetune, 8-bit AdamW", ["optim.optimizer=adamw8bit"]),
    "fp8-frozen": ("full finetune, VAE / T5 / teacher in fp8", ["model.layerwise_casting=float8_e4m3fn"]),
    "group-block": ("full finetune, group offload (block)", ["model.group_offload=block_level"]),
    "group-leaf": ("full finetune, group offload (leaf)", ["model.group_offload=leaf_level"]),
    "cached": ("full finetune, features cached", ["data.cache=true"]),
    "cached+teacher-offload": ("cached, teacher offloaded", ["data.cache=true", "teacher.offload=true"]),
    "lora": ("LoRA r16, AdamW", ["training_type=lora"]),
    "lora+fp8": ("LoRA r16, base + frozen models in fp8", ["training_type=lora", "model.layerwise_casting=float8_e4m3fn"]),
    "lora+all": ("LoRA r16, every saver", ["training_type=lora", "model.layerwise_casting=float8_e4m3fn",
                                           "optim.optimizer=adamw8bit", "model.group_offload=block_level",
                                           "data.cache=true", "teacher.offload=true"]),
}


def build_models(root: Path) -> dict[str, Path]:
    """Write the bench's CogVideoX pipeline and VideoMAE teacher under `root` (once; random, seeded)."""
    paths = {"cogvideox": root / MODELS_VERSION / "cogvideox", "videomae": root / MODELS_VERSION / "videomae"}
    if all(p.is_dir() for p in paths.values()):
        return paths
    import torch
    from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel, VideoMAEConfig, VideoMAEModel

    from gendistill.testing.video import TEXT_LENGTH, tiny_scheduler, tiny_tokenizer

    torch.manual_seed(0)
    text_dim = 512
    tokenizer = tiny_tokenizer()
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=text_dim, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(64, 64, 64), latent_channels=4,
        layers_per_block=1, norm_num_groups=8, temporal_compression_ratio=4, sample_height=SIZE, sample_width=SIZE,
        scaling_factor=1.15258426)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=8, attention_head_dim=64, in_channels=4, out_channels=4, time_embed_dim=128,
        text_embed_dim=text_dim, num_layers=6, sample_width=SIZE // 4, sample_height=SIZE // 4, sample_frames=9,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=TEXT_LENGTH)
    CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                      scheduler=tiny_scheduler()).save_pretrained(paths["cogvideox"])
    teacher = VideoMAEModel(VideoMAEConfig(
        image_size=SIZE, patch_size=16, num_frames=8, tubelet_size=2, hidden_size=384, num_hidden_layers=6,
        num_attention_heads=6, intermediate_size=1536, layer_norm_eps=1e-6))
    teacher.save_pretrained(paths["videomae"])
    return paths


def overrides(paths: dict[str, Path], out: Path, cache: Path, steps: int) -> list[str]:
    return [f"output_dir={out}", f"model.pretrained={paths['cogvideox']}", f"teacher.path={paths['videomae']}",
            "model.tiny=false", f"data.path={ROOT / 'assets' / 'clips'}", f"data.height={SIZE}", f"data.width={SIZE}",
            f"teacher.image_size=[{SIZE},{SIZE}]", "align.align_layer=3", "align.projector_dim=256", "lora.rank=16",
            "lora.alpha=16", f"max_steps={steps}", "checkpoint.every=0", "validation.every=0", "export=false",
            "data.shuffle=false", "report_to=none", "optim.warmup_steps=0", f"data.cache_dir={cache}"]


def _rss() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def _nbytes(t) -> int:
    """Bytes of a tensor; of a wrapper subclass (torchao's 8-bit states), of the tensors inside it."""
    if hasattr(t, "__tensor_flatten__"):
        return sum(_nbytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def _held_bytes(trainer) -> tuple[int, int]:
    """(frozen weight bytes of the loaded models, optimizer state bytes) of a trainer."""
    teacher = trainer.teacher
    if teacher is not None and getattr(teacher, "loaded", True) is False:
        teacher = None  # an offloaded teacher never loaded
    teacher = getattr(teacher, "module", teacher)
    seen, frozen = set(), 0
    for model in (trainer.student, trainer.text_encoder, trainer.vae, teacher):
        for p in (model.parameters() if model is not None else ()):
            if id(p) not in seen and not p.requires_grad:
                seen.add(id(p))
                frozen += _nbytes(p)
    state = trainer.optimizer.optimizer.state if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer.state
    optim = sum(_nbytes(v) for st in state.values() for v in st.values() if hasattr(v, "numel"))
    return frozen, optim


def _malloc_trim() -> None:
    """Hand glibc's freed heap memory back to the system (no-op elsewhere)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_one(row: str, paths: dict[str, Path], work: Path, steps: int) -> dict:
    """Build the trainer of `row`, run `steps` optimizer steps; memory and times (in this process)."""
    import torch

    from gendistill.config import load_config
    from gendistill.video_distill.finetune_config import FinetuneConfig
    from gendistill.video_distill.trainer import VideoREPATrainer

    cfg = load_config(FinetuneConfig, TINY, overrides(paths, work / "runs" / row, work / "cache", steps) + ROWS[row][1])
    cuda = torch.cuda.is_available()
    trainer = VideoREPATrainer(cfg)
    loader = iter(trainer._make_loader(0))
    batches = [next(loader) for _ in range(steps)]
    trainer.student.train()
    import gc

    gc.collect()
    _malloc_trim()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    setup_rss, _ = _rss()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    times = []
    for batch in batches:
        tick = time.perf_counter()
        trainer.training_step(batch)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tick)
    frozen, optim = _held_bytes(trainer)
    from gendistill.plan import measure_step

    teacher = trainer.teacher if getattr(trainer.teacher, "loaded", True) else None
    models = [m for m in (trainer.student, trainer.text_encoder, trainer.vae, getattr(teacher, "module", teacher))
              if m is not None]
    tracked = measure_step(lambda: trainer.step_tensors(batches[-1]), models, [trainer.optimizer])
    result = {"row": row, "setup_rss": setup_rss, "peak_rss": _rss()[1], "frozen": frozen, "optim": optim,
              "tensors": tracked["peak_memory_bytes"],
              "s_per_step": statistics.median(times[1:]) if len(times) > 1 else times[0],
              "first_step_s": times[0], "trainable": trainer.n_trainable,
              "teacher_loaded": getattr(trainer.teacher, "loaded", trainer.teacher is not None)}
    if cuda:
        result.update(cuda_setup=torch.cuda.memory_allocated(), cuda_peak=torch.cuda.max_memory_allocated())
    return result


def _mib(n) -> str:
    return f"{n / 2**20:,.0f}"


def format_table(results: list[dict]) -> str:
    cuda = any("cuda_peak" in r for r in results)
    head = "| row | what | trainable | frozen MiB | optim MiB | tensors MiB | setup RSS MiB | peak RSS MiB |"
    head += " CUDA setup MiB | CUDA peak MiB |" if cuda else ""
    head += " s/step | teacher loaded |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in results:
        cells = [r["row"], ROWS[r["row"]][0], f"{r['trainable']:,}", _mib(r["frozen"]), _mib(r["optim"]),
                 _mib(r["tensors"]),
                 _mib(r["setup_rss"]), _mib(r["peak_rss"])]
        if cuda:
            cells += [_mib(r.get("cuda_setup", 0)), _mib(r.get("cuda_peak", 0))]
        cells += [f"{r['s_per_step']:.2f}", "yes" if r["teacher_loaded"] else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per row (the first is not timed)")
    p.add_argument("--work", default=str(ROOT / "outputs" / "bench-memory-savers"), help="models, cache, runs")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--one", help=argparse.SUPPRESS)  # worker: one row, prints its JSON
    args = p.parse_args(argv)
    work = Path(args.work)
    paths = build_models(work / "models")
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, paths, work, args.steps)), flush=True)
        return 0
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "HF_HUB_OFFLINE": "1"}
    warm = {}  # the feature cache filled first, untimed: one row per cache key (fp8 features differ)
    for row in rows:
        if "data.cache=true" in ROWS[row][1]:
            warm.setdefault(tuple(o for o in ROWS[row][1] if o.startswith("model.layerwise_casting")), row)
    for row in warm.values():
        proc = subprocess.run([sys.executable, __file__, "--one", row, "--steps", "1", "--work", str(work)],
                              env=env, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
    results = []
    for row in rows:
        proc = subprocess.run([sys.executable, __file__, "--one", row, "--steps", str(args.steps), "--work", str(work)],
                              env=env, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(f"{row}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        results.append(json.loads(line[len("RESULT "):]))
        print(f"{row}: done ({results[-1]['s_per_step']:.2f} s/step)", file=sys.stderr, flush=True)
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": args.steps, "rows": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
