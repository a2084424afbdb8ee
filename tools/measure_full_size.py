"""Measure the shipped real-model configs at full size on a CUDA GPU, with random weights.

Each config runs through the same code as its command (`run_edit` / `VideoREPATrainer`, configs
loaded with the CLI's loader), with its models built from `configs/models/` (`random:` sources,
no download) and a few steps. It prints, per config, the peak GPU memory
(`torch.cuda.max_memory_allocated`, whole run and steps only) and seconds per step (median after
the first step), and writes the table as JSON.

    python tools/measure_full_size.py --out outputs/measure [--configs romap_sd3 videorepa_2b_sft ...]

Edits run on the Mip-NeRF 360 garden scene (`../shared/data/test_garden.npz`, 138,766 Gaussians)
with the Gaussians nearest its centre (5%) as the part. Finetunes read synthetic GIF clips
(49 frames at the config's size, written here). Video batch size is `--video-batch` (default 1).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GARDEN = ROOT.parent / "shared" / "data" / "test_garden.npz"

EDIT = {  # config -> the model its guidance names
    "romap_sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
    "sds_sd21": "stabilityai/stable-diffusion-2-1-base",
    "ip2p": "timbrooks/instruct-pix2pix",
}
FINETUNE = {  # config -> (transformer model, teacher path)
    "videorepa_2b_sft": ("THUDM/CogVideoX-2b", "OpenGVLab/VideoMAEv2-Base"),
    "videorepa_5b_lora": ("THUDM/CogVideoX-5b", "OpenGVLab/VideoMAEv2-Base"),
    "repa_baseline": ("THUDM/CogVideoX-5b", "facebook/dinov2-base"),
}


def garden_inputs(work: Path) -> tuple[Path, Path]:
    """The garden scene as a PLY and the 5% of its Gaussians nearest the centre as the part mask."""
    from gendistill.core.scene import GaussianScene

    data = np.load(GARDEN if GARDEN.is_file() else ROOT / ".gpu_data" / "test_garden.npz")
    scene = GaussianScene.from_points(data["means3d"], data["colors"], sh_degree=3)
    work.mkdir(parents=True, exist_ok=True)
    ply = scene.save_ply(work / "garden.ply")
    means = scene.means.double()
    dist = (means - means.median(0).values).norm(dim=1)
    mask = (dist <= dist.quantile(0.05)).numpy()
    np.save(work / "part.npy", mask)
    return Path(ply), work / "part.npy"


def synthetic_clips(folder: Path, n: int, frames: int, height: int, width: int) -> Path:
    """n GIF clips of moving gradients with captions (GIF: readable without ffmpeg)."""
    import imageio.v3 as iio

    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(n):
        video = np.stack([np.stack([(xx + 9 * t + 40 * i) % 256, (yy + 5 * t) % 256,
                                    np.full_like(xx, 30 * i % 256)], -1) for t in range(frames)]).astype(np.uint8)
        iio.imwrite(folder / f"clip{i}.gif", video, extension=".gif", duration=40)
        (folder / f"clip{i}.txt").write_text(f"a colourful gradient sweeping to the right, clip {i}")
    return folder


def _sync():
    torch.cuda.synchronize()


def measure_edit(name: str, steps: int, work: Path) -> dict:
    from gendistill.splat_edit.edit_config import load_edit_config
    from gendistill.splat_edit.editor import run_edit

    ply, mask = garden_inputs(work / "garden")
    overrides = [f"scene={ply}", "part=vase", f"segment.mask_file={mask}", f"out={work / name}",
                 f"guidance.model=random:{EDIT[name]}", f"steps={steps}", "prompt=a vase on a table",
                 "edit_prompt=a golden vase on a table", "densify.enabled=false", "report.turntable_frames=8",
                 "report.grid_views=2"]
    cfg = load_edit_config(ROOT / "configs" / "splat_edit" / f"{name}.yaml", overrides)
    times, peak_steps = [], {}

    def callback(editor, record):
        _sync()
        times.append(time.perf_counter())
        if len(times) == 1:
            torch.cuda.reset_peak_memory_stats()
        peak_steps["bytes"] = torch.cuda.max_memory_allocated()

    torch.cuda.reset_peak_memory_stats()
    error = None
    try:
        run_edit(cfg, callback=callback, progress=False)
    except Exception as err:  # noqa: BLE001 - the report (mp4 needs ffmpeg) may fail after the steps
        error = f"{type(err).__name__}: {err}"
        if len(times) < steps:
            raise
    if len(times) < steps:
        error = f"stopped after {len(times)} of {steps} steps" + (f"; {error}" if error else "")
    return _row(name, times, peak_steps.get("bytes"), "512x512, batch 1", error)


def measure_finetune(name: str, steps: int, work: Path, batch: int) -> dict:
    from gendistill.config import load_config
    from gendistill.video_distill.finetune_config import FinetuneConfig
    from gendistill.video_distill.trainer import VideoREPATrainer

    model, teacher = FINETUNE[name]
    cfg0 = load_config(FinetuneConfig, ROOT / "configs" / "video_distill" / f"{name}.yaml")
    d = cfg0.data
    clips = synthetic_clips(work / f"clips_{d.height}x{d.width}", max(2, batch), d.num_frames, d.height, d.width)
    overrides = [f"output_dir={work / name}", f"model.pretrained=random:{model}", f"teacher.path=random:{teacher}",
                 f"data.path={clips}", f"max_steps={steps}", f"batch_size={batch}", "checkpoint.every=0",
                 "validation.every=0", "export=false"]
    cfg = load_config(FinetuneConfig, ROOT / "configs" / "video_distill" / f"{name}.yaml", overrides)
    torch.cuda.reset_peak_memory_stats()
    trainer = VideoREPATrainer(cfg)
    times, peak, nonfinite = [], {}, set()
    step = trainer.training_step

    def timed(batch_):
        out = step(batch_)
        bad = [k for k, v in out.items() if not math.isfinite(v)]
        if bad:  # random weights in bf16 can overflow; the timing and memory still hold
            nonfinite.update(bad)
            out = {k: 0.0 if k in bad else v for k, v in out.items()}
        _sync()
        times.append(time.perf_counter())
        if len(times) == 1:
            peak["setup_and_first"] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        return out

    trainer.training_step = timed
    trainer.train()
    note = f"non-finite {', '.join(sorted(nonfinite))} loss (random weights)" if nonfinite else None
    row = _row(name, times, torch.cuda.max_memory_allocated(), f"{d.num_frames}x{d.height}x{d.width}, batch {batch}",
               note)
    row["peak_first_step_gib"] = round(peak["setup_and_first"] / 2**30, 2)
    return row


def _row(name, times, peak_steps, shape, error=None) -> dict:
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"config": name, "shape": shape, "steps": len(times),
            "s_per_step": round(statistics.median(gaps), 3) if gaps else None,
            "peak_steps_gib": round(peak_steps / 2**30, 2) if peak_steps else None,
            "gpu": torch.cuda.get_device_name(), "note": error}


def measure(name: str, steps: int, work: Path, video_batch: int) -> dict:
    t0 = time.perf_counter()
    try:
        if name in EDIT:
            row = measure_edit(name, steps, work)
        else:
            row = measure_finetune(name, steps, work, video_batch)
    except Exception as err:  # noqa: BLE001 - report and go on to the next config
        traceback.print_exc()
        row = {"config": name, "error": f"{type(err).__name__}: {err}"[:500]}
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="*", default=list(FINETUNE) + list(EDIT), choices=list(FINETUNE) + list(EDIT))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--video-batch", type=int, default=1)
    p.add_argument("--out", default="outputs/measure", help="measure.json goes here")
    p.add_argument("--work", default="outputs/measure/work", help="scenes, clips and run folders")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # this process measures configs[0]
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("measure_full_size needs a CUDA GPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.one:
        print("ROW " + json.dumps(measure(args.configs[0], args.steps, Path(args.work), args.video_batch)), flush=True)
        return
    rows = []
    for name in args.configs:  # one process each: a clean GPU and allocator for every measurement
        cmd = [sys.executable, __file__, "--one", "--configs", name, "--steps", str(args.steps),
               "--video-batch", str(args.video_batch), "--out", str(out), "--work", args.work]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        found = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        print(proc.stdout[-3000:], flush=True)
        rows.append(json.loads(found[0]) if found else {"config": name, "error": f"exit {proc.returncode}"})
        (out / "measure.json").write_text(json.dumps(rows, indent=1))
    print("\n| config | input | s/step | peak GiB (steps) | wall s | note |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r.get('shape', '')} | {r.get('s_per_step')} | {r.get('peak_steps_gib')} | "
              f"{r.get('wall_s')} | {r.get('error') or r.get('note') or ''} |")


if __name__ == "__main__":
    main()
