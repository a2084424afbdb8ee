"""Seconds per `gendistill edit` optimisation step, split by stage, and peak memory (tiny models).

    .venv/bin/python tools/bench_edit.py                          # tiny SD3 (rfds) at 64x64 and 128x128
    .venv/bin/python tools/bench_edit.py --guidance sd --sizes 64 --steps 20 --repeats 5
    .venv/bin/python tools/bench_edit.py --device cuda --sizes 256 512

Stages (PartEditor.step with profile=true, CUDA synchronised around each):
  render           rasterizing the scene (frozen rest + the part) for the SDS and anchor views; on
                   CPU the rest's projection and render per view are cached (`RestCache`), which the
                   anchor stage fills for the whole ring before the timed steps
  encode           VAE encoding of the SDS view (diffusion model)
  diffusion        the denoiser passes of the score-distillation gradient (diffusion model)
  backward model   the losses and their gradient w.r.t. the rendered pixels (through the VAE encoder)
  backward render  pixels -> Gaussian parameters (the rasterizer's backward)
  optimizer        Adam on the part's parameters (densification is off here: it runs every 50 steps)
"outside" is the share of render + backward render + optimizer in a step. Each size runs in its own
process so that its peak memory (RSS on CPU, max allocated on CUDA) is its own. Times are medians over
`--repeats` runs of `--steps` steps after 2 warm-up steps; on a shared machine they are noisy.
The environment is passed on as it is: OMP_WAIT_POLICY=PASSIVE (as `make test` sets it) slows the
many small torch ops of a CPU step, the tiny models' more than the renderer's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["render", "encode", "diffusion", "backward_model", "backward_render", "optimizer"]
OUTSIDE = ["render", "backward_render", "optimizer"]
GUIDANCE = {  # tiny pipeline -> overrides of configs/splat_edit/tiny_cpu.yaml
    "sd3": [],
    "sd": ["guidance.tiny=sd", "guidance.kind=sds", "guidance.weighting=sds", "guidance.t_range=[0.02,0.98]",
           "guidance.pipeline_kwargs={}"],
    # the bundled demo model (assets/models/snowman-tiny, 32x32 pixel space), as `make demo` uses it
    "demo": [f"guidance.model={ROOT / 'assets/models/snowman-tiny'}", "guidance.tiny=null", "guidance.kind=sds",
             "guidance.weighting=sds", "guidance.guidance_scale=20.0", "guidance.t_range=[0.2,0.9]",
             "guidance.resolution=[32,32]", "guidance.pipeline_kwargs={}", "anchors.method=none", "anchors.count=0",
             "lambda_anchor=0.0", "batch_size=4"],
    "ip2p": ["guidance.tiny=ip2p", "guidance.kind=ip2p", "guidance.guidance_scale=7.5", "guidance.weighting=sds",
             "guidance.t_range=[0.02,0.98]", "guidance.pipeline_kwargs={}", "anchors.ip2p_steps=2"],
}


def worker(size: int, guidance: str, steps: int, repeats: int, device: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from gendistill.splat_edit.edit_config import load_edit_config
    from gendistill.splat_edit.editor import anchor_stage, prepare_edit

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"scene={ROOT / 'assets/scenes/snowman.ply'}", "part=hat", "prompt=a snowman with a hat",
                     "edit_prompt=a snowman with a gold hat", f"out={tmp}", f"cameras.width={size}",
                     f"cameras.height={size}", "profile=true", "densify.enabled=false", f"device={device}",
                     f"guidance.model={ROOT / 'outputs/tiny-models' / ('splat_edit_' + guidance)}",
                     *GUIDANCE[guidance]]
        cfg = load_edit_config(ROOT / "configs/splat_edit/tiny_cpu.yaml", overrides)
        cfg.steps = steps * repeats + 2
        editor, method = prepare_edit(cfg)
        anchor_stage(editor, cfg, method)
        for _ in range(2):
            editor.step()
        runs = []
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        for _ in range(repeats):
            editor.timer.totals.clear()
            for _ in range(steps):
                editor.step()
            runs.append({k: editor.timer.totals.get(k, 0.0) / steps for k in STAGES})
    per_step = {k: statistics.median(r[k] for r in runs) for k in STAGES}
    totals = [sum(r.values()) for r in runs]
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"size": size, "guidance": guidance, "device": device, "per_step": per_step,
            "total": statistics.median(totals), "total_min": min(totals), "total_max": max(totals),
            "gaussians": len(editor.params["means"]) + len(editor.rest["means"]), "peak_mb": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--guidance", choices=sorted(GUIDANCE), default="sd3")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        result = worker(args.worker, args.guidance, args.steps, args.repeats, args.device, args.threads)
        print("RESULT " + json.dumps(result))
        return
    env = {**os.environ}
    results = []
    for size in args.sizes:
        cmd = [sys.executable, __file__, "--worker", str(size), "--guidance", args.guidance, "--steps",
               str(args.steps), "--repeats", str(args.repeats), "--device", args.device, "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.exit(f"benchmark worker for {size}x{size} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(line[len("RESULT "):]))
    head = ("| size | render | encode | diffusion | backward model | backward render | optimizer | s/step "
            "(min-max) | outside share | peak memory |")
    print(f"gendistill edit, tiny {args.guidance} guidance, snowman ({results[0]['gaussians']} Gaussians), "
          f"{args.device}, {args.threads} threads; seconds per step, median of {args.repeats} x {args.steps} steps\n")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in results:
        s = r["per_step"]
        outside = sum(s[k] for k in OUTSIDE) / max(sum(s.values()), 1e-12)
        mem = f"{r['peak_mb']:.0f} MB {'allocated' if r['device'].startswith('cuda') else 'RSS'}"
        print(f"| {r['size']}x{r['size']} | " + " | ".join(f"{s[k]:.4f}" for k in STAGES)
              + f" | {r['total']:.3f} ({r['total_min']:.3f}-{r['total_max']:.3f}) | {outside:.0%} | {mem} |")


if __name__ == "__main__":
    main()
