"""Seconds per training step and peak memory of the tiny VideoREPA config, with and without TRD.

    python tools/bench_finetune.py [--steps 20] [--warmup 3] [--repeats 3] [key=value ...]

Each variant runs in its own process (so peak memory is its own): a fresh trainer, `warmup`
steps, then `steps` optimizer steps timed `repeats` times; the median and min are printed. Memory:
the process's peak RSS (CPU; models, data and training together) or the CUDA peak allocation
during the timed steps. Extra key=value overrides apply to every variant (e.g. training_type=lora).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gendistill.config import load_config  # noqa: E402
from gendistill.testing.video import write_tiny_models  # noqa: E402
from gendistill.video_distill.finetune_config import FinetuneConfig  # noqa: E402
from gendistill.video_distill.trainer import VideoREPATrainer  # noqa: E402

VARIANTS = {
    "diffusion only": ["align.loss=none"],
    "diffusion + TRD": ["align.loss=trd"],
    "diffusion + REPA": ["align.loss=repa", "align.downsampler=area", "align.drop_first_frame=false"],
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def bench(overrides: list[str], steps: int, warmup: int, repeats: int) -> dict:
    cfg = load_config(FinetuneConfig, ROOT / "configs" / "video_distill" / "tiny_cpu.yaml", overrides)
    trainer = VideoREPATrainer(cfg)
    loader = iter(trainer._make_loader(0))
    for _ in range(warmup):
        trainer.training_step(next(loader))
    cuda = trainer.device.type == "cuda"
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.training_step(next(loader))
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / steps)
    mem = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb()
    return {"median": statistics.median(times), "min": min(times), "mem": mem, "cuda": cuda,
            "rss": peak_rss_mb(), "trainable": trainer.n_trainable}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: one variant, JSON out
    parser.add_argument("--models", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if args.only:
        with tempfile.TemporaryDirectory() as tmp:
            base = [f"output_dir={tmp}/out", f"model.pretrained={args.models}/cogvideox",
                    f"teacher.path={args.models}/videomae", "checkpoint.every=0", "validation.every=0", "export=false"]
            r = bench(base + VARIANTS[args.only] + list(args.overrides), args.steps, args.warmup, args.repeats)
        print("RESULT " + json.dumps(r))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_models(Path(tmp))
        for name in VARIANTS:
            cmd = [sys.executable, __file__, "--only", name, "--models", tmp, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--repeats", str(args.repeats), *args.overrides]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            rows.append((name, json.loads(line[0][7:])))
    cuda = rows[0][1]["cuda"]
    device = "CUDA" if cuda else f"CPU ({torch.get_num_threads()} threads)"
    mem_name = "peak CUDA alloc MiB" if cuda else "peak RSS MiB"
    print(f"tiny_cpu.yaml on {device}: {args.steps} steps x {args.repeats} repeats after {args.warmup} warm-up "
          f"steps; overrides: {' '.join(args.overrides) or 'none'}")
    print(f"| variant | s/step median | s/step min | {mem_name} | trainable params |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['median']:.4f} | {r['min']:.4f} | {r['mem'] if cuda else r['rss']:.0f} | "
              f"{r['trainable']:,} |")
    print("(CPU timings on a shared machine are noisy: repeat the run)")


if __name__ == "__main__":
    main()
