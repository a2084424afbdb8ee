"""Benchmark one score-distillation step (loss + backward from the images) per guidance kind.

Prints seconds per step (the median of the timed steps), the seconds spent inside the
diffusion model (UNet / transformer forward calls, timed with hooks), the share of the step
spent outside it (VAE encode and its backward, prompt lookup, noise, loss), and peak memory. Peak memory on CPU is the growth of
the process's peak resident set (VmHWM, reset through /proc/self/clear_refs after a warm-up
step) over its resident set before the timed steps; on CUDA, torch.cuda.max_memory_allocated
over the allocation before them.

    .venv/bin/python tools/bench_guidance.py                         # tiny models, 64 and 128, CPU
    .venv/bin/python tools/bench_guidance.py --device cuda --sizes 512
    .venv/bin/python tools/bench_guidance.py --model stabilityai/stable-diffusion-2-1-base \
        --device cuda --dtype float16 --sizes 512
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class MemoryMeter:
    """Peak memory growth (MiB) during a block: CUDA allocations or the process's resident set."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            except OSError:
                pass
            self.base = _rss_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _rss_kib("VmHWM") * 1024
        self.peak_mib = max(peak - self.base, 0) / 2**20


def time_module(module: torch.nn.Module, device: torch.device) -> dict:
    """Forward hooks adding the module's forward wall time to `stats["seconds"]`."""
    stats = {"seconds": 0.0, "calls": 0}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def pre(*_):
        sync()
        stats["start"] = time.perf_counter()

    def post(*_):
        sync()
        stats["seconds"] += time.perf_counter() - stats["start"]
        stats["calls"] += 1

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post)
    return stats


def bench(guidance, size: int, batch: int, steps: int, prompt: str) -> dict:
    device = guidance.device
    extra = {}
    if guidance.kind == "ip2p":
        extra["image_cond"] = torch.rand(batch, 3, size, size, device=device)
    stats = time_module(guidance.denoiser, device)

    def step():
        images = torch.rand(batch, 3, size, size, device=device, requires_grad=True)
        guidance.loss(images, prompt, **extra).backward()

    step()  # warm-up: prompt encoding (cached afterwards), allocator, kernels
    totals, models = [], []
    with MemoryMeter(device) as mem:
        for _ in range(steps):
            stats["seconds"] = 0.0
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            totals.append(time.perf_counter() - start)
            models.append(stats["seconds"])
    i = sorted(range(steps), key=totals.__getitem__)[steps // 2]  # the median step (robust to a busy machine)
    total, model = totals[i], models[i]
    return {"step_s": total, "model_s": model, "outside": 1.0 - model / total, "peak_mib": mem.peak_mib}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["sd", "sd_v", "sd3", "ip2p"],
                   help="tiny pipelines from gendistill/testing/diffusion.py")
    p.add_argument("--model", help="a hub id or local folder instead of the tiny pipelines")
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 128])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="e.g. float16 (for --model or tiny models on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from gendistill.core.guidance import load_guidance

    if args.model:
        cases = [(args.model, lambda: args.model)]
    else:
        from gendistill.testing.diffusion import BUILDERS

        cases = [(name, BUILDERS[name]) for name in args.models]
    print(f"device {args.device}, batch {args.batch}, median of {args.steps} timed steps after one warm-up, "
          f"torch threads {torch.get_num_threads()}")
    header = f"{'model':<10} {'kind':<5} {'size':>5} {'s/step':>9} {'model s':>9} {'outside':>8} {'peak MiB':>9}"
    print(header)
    print("-" * len(header))
    for name, build in cases:
        guidance = load_guidance(build(), guidance_scale=7.5, device=args.device, dtype=args.dtype)
        for size in args.sizes:
            r = bench(guidance, size, args.batch, args.steps, "a photo of a red car")
            print(f"{name:<10} {guidance.kind:<5} {size:>5} {r['step_s']:>9.4f} {r['model_s']:>9.4f} "
                  f"{r['outside']:>7.0%} {r['peak_mib']:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
