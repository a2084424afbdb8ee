"""`make demo-video`: the video half offline on a CPU, with the bundled tiny models.

    python -m gendistill.video_distill.demo [--out outputs/demo_video] [--steps 500] [--seeds 5]

1. Held-out clips (seed 3, not seen by the base model) are written to `out/clips/` with a manifest.
2. `gendistill finetune` runs twice from the bundled base model (`assets/models/video_demo_base`), same
   steps and seed: `configs/video_distill/demo_plain.yaml` (align.loss=none) and `demo_trd.yaml` (TRD
   towards `assets/models/video_demo_teacher`).
3. `gendistill generate` makes a video for each held-out prompt and seed with the base and both finetunes.
4. Every video is scored by `physics.physics_score` with the prompt's colour and caption; per model the
   per-seed means are summarized over seeds (mean and 95% t interval): `out/results.json`,
   `out/report.html` (the table and the videos side by side).

The commands run in this process through the same argparse entry points as the `gendistill` command.
Two reference rows come with them: the simulated clips behind the held-out prompts ("real") and the same
clips encoded and decoded by the base model's VAE ("real through the VAE": what a perfect transformer would
score with this VAE). Helpers (`held_out_prompts`, `sample_videos`, `moving_ball`) are shared with the model
trainer and the tests.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from gendistill.core.io import atomic_path
from gendistill.core.media import contact_sheet, read_video, write_image, write_video
from gendistill.video_distill.physics import COLOURS, parse_caption, physics_score, render_clip, simulate_clip, \
    simulate_trajectory, summarize, track_ball, write_clip

__all__ = ["BASE_MODEL", "TEACHER_MODEL", "MODELS", "METRICS", "prompt_colour", "held_out_clips", "held_out_prompts",
           "write_clips", "reconstruct",
           "load_base", "sample_videos", "moving_ball", "score_video", "summarize_model", "run", "write_report",
           "format_table", "main"]

ROOT = Path(__file__).resolve().parents[2]
BASE_MODEL = ROOT / "assets/models/video_demo_base"
TEACHER_MODEL = ROOT / "assets/models/video_demo_teacher"
CONFIGS = {"plain": ROOT / "configs/video_distill/demo_plain.yaml", "trd": ROOT / "configs/video_distill/demo_trd.yaml"}
MODELS = {"real": "real clips (reference)", "real_vae": "real clips through the VAE (reference)",
          "base": "base model", "plain": "finetune (plain)", "trd": "finetune + TRD"}
REFERENCES = ("real", "real_vae")
# per-video fields averaged per seed: name -> (label, kind)
METRICS = {"residual_px": ("residual px (RMS, lower is better)", "px"),
           "gravity_acc": ("gravity accuracy", "rate"),
           "bounce_acc": ("bounce accuracy", "rate"),
           "colour_acc": ("colour accuracy", "rate"),
           "moving_ball": ("moving ball of the colour", "rate"),
           "implausibility_px": ("implausibility px (lower is better)", "px")}
HELD_OUT_SEED = 3
FRAMES, SIZE = 9, 32


def prompt_colour(prompt: str) -> str | None:
    return parse_caption(prompt)["colour"]


def held_out_clips(per_colour: int = 2, seed: int = HELD_OUT_SEED,
                   colours: Sequence[str] | None = None) -> list[tuple[str, np.ndarray]]:
    """Simulated held-out clips (rng [seed, 1]), `per_colour` for each colour, colour-major: [(caption, uint8
    frames [9, 32, 32, 3])]. `colours` keeps only those (the others are still drawn, so the clips stay the same)."""
    rng = np.random.default_rng([seed, 1])
    out = []
    for c in COLOURS:
        for _ in range(per_colour):
            traj = simulate_trajectory(rng, FRAMES, SIZE, colour=c)
            if colours is None or c in colours:
                out.append((traj["caption"], render_clip(traj)))
    return out


def held_out_prompts(per_colour: int = 2, seed: int = HELD_OUT_SEED, colours: Sequence[str] | None = None) -> list[str]:
    """The captions of `held_out_clips`: prompts the base model was not trained on as clips."""
    return [caption for caption, _ in held_out_clips(per_colour, seed, colours)]


def write_clips(folder: str | os.PathLike, n: int, seed: int = HELD_OUT_SEED) -> Path:
    """n simulated clips (rng [seed, 0]) as lossless mp4s in `folder`, with manifest.csv; returns the manifest."""
    folder = Path(folder)
    rng = np.random.default_rng([seed, 0])
    rows = []
    for i in range(n):
        video, traj, caption = simulate_clip(rng, FRAMES, SIZE)
        name = f"{i:05d}.mp4"
        if not (folder / name).is_file():
            write_clip(folder / name, video)
        rows.append({"video": name, "caption": caption, "colour": traj["colour"]})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["video", "caption", "colour"])
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(folder / "manifest.csv") as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    return folder / "manifest.csv"


def reconstruct(vae, frames: np.ndarray) -> np.ndarray:
    """uint8 frames [T, H, W, 3] through the VAE (posterior mean, decoded): float [T, H, W, 3] in [0, 1]."""
    import torch

    with torch.no_grad():
        x = torch.from_numpy(np.asarray(frames)).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]
        rec = vae.decode(vae.encode(x.to(vae.dtype)).latent_dist.mean).sample[0]
    return ((rec.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).numpy()


def load_base(folder: str | os.PathLike = BASE_MODEL, transformer: str | os.PathLike | None = None):
    """The pipeline on CPU in float32, loaded as `gendistill generate` loads it."""
    from gendistill.video_distill.generate import load_video_pipeline

    return load_video_pipeline(str(folder), transformer=transformer, device="cpu")


def sample_videos(pipe, prompts: Sequence[str], *, steps: int = 20, guidance_scale: float = 3.0, seed: int = 0,
                  batch: int = 16) -> list[np.ndarray]:
    """Videos (float [T, H, W, 3] in [0, 1]) for the prompts, `batch` at a time with one generator per batch
    (seeded seed + batch index): faster than `generate_videos`, whose seeds are per prompt."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    out = []
    for b, start in enumerate(range(0, len(prompts), batch)):
        chunk = list(prompts[start:start + batch])
        g = torch.Generator().manual_seed(seed + b)
        frames = pipe(prompt=chunk, num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=steps,
                      guidance_scale=guidance_scale, generator=g, output_type="np",
                      max_sequence_length=pipe.transformer.config.max_text_seq_length).frames
        out += [np.asarray(f) for f in frames]
    return out


def moving_ball(frames, colour: str | None, *, min_found: float = 0.75, min_move_px: float = 3.0,
                max_radius_px: float = 6.0) -> bool:
    """A ball of `colour` (the clip's dominant saturated hue is that colour) is found in at least `min_found`
    of the frames, no larger than `max_radius_px` (median; the simulated balls have radii of 2.2-3.5 px at
    32 x 32), and its centre moves at least `min_move_px` from where it starts."""
    track = track_ball(frames, colour)
    found = track["found"]
    if colour is None or track["colour"] != colour or found.mean() < min_found:
        return False
    if float(np.median(track["radius"][found])) > max_radius_px:
        return False
    x, y = track["x"][found], track["y"][found]
    return bool(np.hypot(x - x[0], y - y[0]).max() >= min_move_px)


def score_video(frames, prompt: str) -> dict:
    """`physics_score` with the prompt's colour and caption, and the demo's per-video fields (`METRICS`)."""
    colour = prompt_colour(prompt)
    s = physics_score(frames, colour, caption=prompt)
    return {"prompt": prompt, "residual_px": s["residual_px"], "gravity_acc": bool(s["gravity_down"]),
            "bounce_acc": bool(s.get("caption_bounces_match")), "colour_acc": bool(s["colour_match"]),
            "moving_ball": moving_ball(frames, colour), "implausibility_px": s["implausibility_px"],
            "found_fraction": s["found_fraction"], "bounces": s["bounces"], "gravity": s["gravity"]}


def summarize_model(per_seed: dict[int, list[dict]]) -> dict:
    """{metric: {"mean", "low", "high", "n"}}: the per-seed means (over prompts; nan left out) summarized over
    seeds with `physics.summarize` (Student t, 95%), plus "per_seed" {seed: {metric: mean}}."""
    means = {}
    for seed, scores in per_seed.items():
        row = {}
        for key in METRICS:
            vals = np.asarray([float(s[key]) for s in scores], float)
            vals = vals[np.isfinite(vals)]
            row[key] = float(vals.mean()) if len(vals) else float("nan")
        means[seed] = row
    out = summarize(list(means.values()))
    out["per_seed"] = means
    return out


def _clear_run(run_dir: Path) -> None:
    """Remove an earlier run's outputs from `run_dir` (its log would be appended to), keeping the feature cache."""
    import shutil

    if run_dir.is_dir():
        for child in run_dir.iterdir():
            if child.name != "cache":
                shutil.rmtree(child) if child.is_dir() else child.unlink()


def _cli(argv: list[str]) -> int:
    """Run `gendistill finetune ...` / `gendistill generate ...` in this process (the commands' own parsers)."""
    from gendistill.video_distill.cli import add_finetune_parser, add_generate_parser

    parser = argparse.ArgumentParser(prog="gendistill")
    sub = parser.add_subparsers(dest="command", required=True)
    add_finetune_parser(sub)
    add_generate_parser(sub)
    args = parser.parse_args(argv)
    print("$ gendistill " + " ".join(argv), flush=True)
    return args.run(args) or 0


def run(out: str | os.PathLike = "outputs/demo_video", *, steps: int = 500, seeds: int = 5, per_colour: int = 2,
        clips: int = 256, inference_steps: int = 20, guidance_scale: float = 3.0, seed: int = 42,
        base: str | os.PathLike = BASE_MODEL, teacher: str | os.PathLike = TEACHER_MODEL,
        overrides: Sequence[str] = (), colours: Sequence[str] | None = None) -> dict:
    """The whole demo; returns (and writes to out/results.json) the per-model summaries and every score.
    `colours`: only the held-out prompts of these colours (default: all of `physics.COLOURS`)."""
    t0 = time.perf_counter()
    out = Path(out)
    seconds = {}
    manifest = write_clips(out / "clips", clips)
    seconds["clips"] = time.perf_counter() - t0
    references = held_out_clips(per_colour, colours=colours)
    prompts = [caption for caption, _ in references]
    with atomic_path(out / "prompts.txt") as tmp:
        tmp.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    scores: dict[str, dict[int, list[dict]]] = {}
    videos: dict[str, dict[int, list[str]]] = {}
    from diffusers import AutoencoderKLCogVideoX

    from gendistill.video_distill.generate import prompt_filename

    vae = AutoencoderKLCogVideoX.from_pretrained(str(base), subfolder="vae").eval()
    for name in REFERENCES:  # written and read back as the generated videos are
        paths = [out / "videos" / name / prompt_filename(k, p) for k, p in enumerate(prompts)]
        for path, (_, frames) in zip(paths, references):
            write_video(path, frames if name == "real" else reconstruct(vae, frames), fps=8)
        scores[name] = {0: [score_video(read_video(p), pr) for p, pr in zip(paths, prompts)]}
        videos[name] = {0: [p.relative_to(out).as_posix() for p in paths]}
    del vae
    seconds["references"] = time.perf_counter() - t0 - seconds["clips"]
    transformers = {"base": None}
    for name in ("plain", "trd"):
        t = time.perf_counter()
        run_dir = out / "finetune" / name
        _clear_run(run_dir)
        code = _cli(["finetune", "--config", str(CONFIGS[name]), f"output_dir={run_dir}", f"max_steps={steps}",
                     f"seed={seed}", f"model.pretrained={base}", f"teacher.path={teacher}", f"data.path={manifest}",
                     *overrides])
        if code:
            raise RuntimeError(f"gendistill finetune ({name}) exited with {code}")
        transformers[name] = run_dir / "export" / "transformer"
        seconds[f"finetune_{name}"] = time.perf_counter() - t
    for name, tdir in transformers.items():
        t = time.perf_counter()
        scores[name], videos[name] = {}, {}
        for s in range(seeds):
            folder = out / "videos" / name / f"seed{s}"
            argv = ["generate", "--model", str(base), "--prompts", str(out / "prompts.txt"), "--out", str(folder),
                    "--steps", str(inference_steps), "--guidance-scale", str(guidance_scale),
                    "--seed", str(1000 * s), "--device", "cpu", "--frames", str(FRAMES), "--height", str(SIZE),
                    "--width", str(SIZE)]
            if tdir is not None:
                argv += ["--transformer", str(tdir)]
            if _cli(argv):
                raise RuntimeError(f"gendistill generate ({name}, seed {s}) failed")
            paths = [folder / prompt_filename(k, p) for k, p in enumerate(prompts)]
            scores[name][s] = [score_video(read_video(p), pr) for p, pr in zip(paths, prompts)]
            videos[name][s] = [p.relative_to(out).as_posix() for p in paths]
        seconds[f"generate_{name}"] = time.perf_counter() - t
    summary = {name: summarize_model(per_seed) for name, per_seed in scores.items()}
    seconds["total"] = time.perf_counter() - t0
    results = {"prompts": prompts, "seeds": seeds, "steps": steps, "seed": seed, "clips": clips,
               "inference_steps": inference_steps, "guidance_scale": guidance_scale, "base": str(base),
               "teacher": str(teacher), "summary": summary, "scores": scores, "videos": videos, "seconds": seconds}
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=1, default=float), encoding="utf-8")
    write_report(out, results)
    return results


def _cell(stat: dict | None, kind: str) -> str:
    if not stat or not math.isfinite(stat.get("mean", float("nan"))):
        return "n/a"
    scale, fmt = (100.0, "{:.0f}%") if kind == "rate" else (1.0, "{:.2f}")
    low, high = stat["low"], stat["high"]
    if kind == "rate":  # a t interval of a rate can pass 0 or 1: shown clipped
        low, high = max(low, 0.0), min(high, 1.0)
    text = fmt.format(scale * stat["mean"])
    if math.isfinite(low):
        text += " [" + fmt.format(scale * low).rstrip("%") + ", " + fmt.format(scale * high) + "]"
    return text


def format_table(results: dict) -> str:
    """The results as a markdown table: one row per model, mean [95% interval over seeds] per metric."""
    head = "| model | " + " | ".join(label for label, _ in METRICS.values()) + " |"
    rows = [head, "|" + " --- |" * (len(METRICS) + 1)]
    for name, label in MODELS.items():
        stats = results["summary"].get(name)
        if stats is not None:
            rows.append(f"| {label} | " + " | ".join(_cell(stats.get(k), kind) for k, (_, kind) in METRICS.items())
                        + " |")
    return "\n".join(rows)


def write_report(out: str | os.PathLike, results: dict) -> Path:
    """out/report.html: the settings, the table, and for every prompt the videos of the references and the
    three models side by side (seed 0; the other seeds linked), plus out/videos_seed0.png (every frame of
    those videos: one prompt a row, one model a column)."""
    e = html.escape
    out = Path(out)
    names = [n for n in MODELS if n in results["videos"]]
    first = {name: min(results["videos"][name]) for name in names}
    sheet = []
    for k in range(len(results["prompts"])):
        for name in names:
            frames = read_video(out / results["videos"][name][first[name]][k])
            sheet.append(np.concatenate(list(frames), axis=1))  # the frames of one video in a row
    write_image(out / "videos_seed0.png", contact_sheet(sheet, cols=len(names), pad=4))
    table_rows = []
    for name in names:
        stats = results["summary"][name]
        cells = "".join(f"<td>{e(_cell(stats.get(k), kind))}</td>" for k, (_, kind) in METRICS.items())
        table_rows.append(f"<tr><th>{e(MODELS[name])}</th>{cells}</tr>")
    header = "".join(f"<th>{e(label)}</th>" for label, _ in METRICS.values())
    rows = []
    for k, prompt in enumerate(results["prompts"]):
        cells = []
        for name in names:
            rel = results["videos"][name][first[name]][k]
            sc = results["scores"][name][first[name]][k]
            note = (f"colour {'ok' if sc['colour_acc'] else 'no'}, gravity {'ok' if sc['gravity_acc'] else 'no'}, "
                    f"bounces {'ok' if sc['bounce_acc'] else 'no'}, residual "
                    + ("n/a" if not math.isfinite(sc["residual_px"]) else f"{sc['residual_px']:.2f} px"))
            others = " ".join(f'<a href="{e(results["videos"][name][s][k])}">seed {s}</a>'
                              for s in results["videos"][name] if s != first[name])
            cells.append(f'<td><video src="{e(rel)}" autoplay loop muted playsinline></video><br>'
                         f'<small>{e(note)}<br>{others}</small></td>')
        rows.append(f"<tr><th>{e(prompt)}</th>{''.join(cells)}</tr>")
    sec = results["seconds"]
    settings = (f"{results['steps']} finetuning steps (seed {results['seed']}) on {results['clips']} held-out clips; "
                f"{len(results['prompts'])} held-out prompts x {results['seeds']} seeds per model, "
                f"{results['inference_steps']} sampling steps, guidance {results['guidance_scale']}; "
                f"{sec['total']:.0f} s in all")
    text = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>gendistill: the video half, offline</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; }}
video, img {{ image-rendering: pixelated; border: 1px solid #ccc; }}
video {{ width: 160px; height: 160px; }}
table {{ border-collapse: collapse; }} th, td {{ text-align: left; padding: 4px 10px; border-bottom: 1px solid #eee;
vertical-align: top; }}
</style></head><body>
<h1>Physics of generated videos: base, plain finetune, finetune with TRD</h1>
<p>{e(settings)}. Base model: <code>{e(results['base'])}</code>; teacher: <code>{e(results['teacher'])}</code>.</p>
<p>Per model: the mean over seeds of each seed's mean over prompts, with a 95% t interval over seeds.
Residual: RMS distance (px) of the tracked ball from the best bouncing-ball fit; gravity accuracy: the fitted
acceleration points down; bounce accuracy: as many bounces as the prompt says; colour accuracy: the ball is
the prompted colour; implausibility: the physics metric's total (px). The reference rows are one pass over the
prompts' own simulated clips (no seeds): the simulator, and its clips encoded and decoded by the base model's VAE
(about what a perfect generator with this VAE would score).</p>
<table><tr><th>model</th>{header}</tr>{''.join(table_rows)}</table>
<h2>Videos (seed {min(first.values()) if first else 0}): {' | '.join(e(MODELS[n]) for n in names)}</h2>
<table><tr><th>prompt</th>{''.join(f'<th>{e(MODELS[n])}</th>' for n in names)}</tr>{''.join(rows)}</table>
<h2>Every frame (seed 0): one prompt a row; columns: {', '.join(e(MODELS[n]) for n in names)}</h2>
<img src="videos_seed0.png" alt="frames" style="width: 100%">
<p><a href="results.json">results.json</a> &middot; <a href="prompts.txt">prompts.txt</a></p>
</body></html>
"""
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out / "report.html"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gendistill.video_distill.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo_video")
    p.add_argument("--steps", type=int, default=500, help="finetuning steps of each run")
    p.add_argument("--seeds", type=int, default=5, help="generation seeds per prompt")
    p.add_argument("--per-colour", type=int, default=2, help="held-out prompts per colour")
    p.add_argument("--clips", type=int, default=256, help="held-out finetuning clips")
    p.add_argument("--inference-steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=42, help="finetuning seed (both runs)")
    p.add_argument("--base", default=str(BASE_MODEL))
    p.add_argument("--teacher", default=str(TEACHER_MODEL))
    p.add_argument("overrides", nargs="*", metavar="key=value", help="finetune config overrides (both runs)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(min(torch.get_num_threads(), 2))
    results = run(args.out, steps=args.steps, seeds=args.seeds, per_colour=args.per_colour, clips=args.clips,
                  inference_steps=args.inference_steps, guidance_scale=args.guidance_scale, seed=args.seed,
                  base=args.base, teacher=args.teacher, overrides=args.overrides)
    print(format_table(results))
    print(f"demo-video: {results['seconds']['total']:.0f} s; report {Path(args.out) / 'report.html'}, "
          f"results {Path(args.out) / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
