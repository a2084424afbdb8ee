"""Outputs of `gendistill edit`: masks, anchor targets, before/after grid and turntable, loss curve,
metrics (PSNR outside the part, mean part colour, CLIP similarity and CLIP directional similarity),
summary.json and one self-contained report.html. Every file is written atomically.
"""

from __future__ import annotations

import html
import json
import math
import shlex
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gendistill.core.cameras import orbit_path
from gendistill.core.io import atomic_path
from gendistill.core.media import contact_sheet, to_uint8, write_image, write_video
from gendistill.core.render.sh import sh_to_rgb

__all__ = ["write_mask", "write_anchors", "write_summary", "write_report", "loss_curve_image", "psnr_outside",
           "clip_scores", "turntable_cameras"]

# OpenAI CLIP preprocessing constants (used when the model folder has no preprocessor_config.json)
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_CURVE_COLORS = {"loss": (20, 20, 20), "sds": (31, 119, 180), "anchor": (214, 39, 40)}


# ---------------------------------------------------------------------- files written during the run
def write_mask(out: Path, part: str, mask: Tensor) -> Path:
    """masks3d/<part>.npy: [N] bool indexed like the input scene (the layout `gendistill segment` writes)."""
    path = Path(out) / "masks3d" / f"{part}.npy"
    with atomic_path(path) as tmp:
        np.save(tmp, mask.detach().cpu().numpy().astype(bool))
    return path


def write_anchors(out: Path, anchors) -> list[dict]:
    """anchors/view<k>_{render,mask,target}.png for every anchor view; returns their relative paths."""
    rows = []
    for i, view in enumerate(anchors.views):
        names = {kind: f"anchors/view{view:03d}_{kind}.png" for kind in ("render", "mask", "target")}
        write_image(Path(out) / names["render"], anchors.images[i].permute(1, 2, 0))
        write_image(Path(out) / names["mask"], anchors.masks[i, :, :, None].float())
        write_image(Path(out) / names["target"], anchors.targets[i].permute(1, 2, 0))
        rows.append({"view": view, **names})
    return rows


def write_summary(out: Path, summary: dict) -> Path:
    path = Path(out) / "summary.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(summary, indent=1, default=str))
    return path


# ---------------------------------------------------------------------- pictures
def _line(canvas: np.ndarray, p0, p1, color, width: int = 1) -> None:
    n = int(max(abs(p1[0] - p0[0]), abs(p1[1] - p0[1]))) + 1
    xs = np.round(np.linspace(p0[0], p1[0], n)).astype(int)
    ys = np.round(np.linspace(p0[1], p1[1], n)).astype(int)
    h, w = canvas.shape[:2]
    for dx in range(-(width // 2), width - width // 2):
        for dy in range(-(width // 2), width - width // 2):
            x, y = np.clip(xs + dx, 0, w - 1), np.clip(ys + dy, 0, h - 1)
            canvas[y, x] = color


def loss_curve_image(history: list[dict], keys=("loss", "sds", "anchor"), size=(720, 360)) -> tuple[np.ndarray, dict]:
    """A line plot [H, W, 3] uint8 of each series in `history` scaled to its own [min, max] (thin:
    raw, thick: moving average), with the ranges returned for the legend {key: (min, max)}."""
    w, h = size
    m = 24
    canvas = np.full((h, w, 3), 255, np.uint8)
    for f in (0.0, 0.25, 0.5, 0.75, 1.0):  # grid
        y = int(round(m + (1 - f) * (h - 2 * m)))
        _line(canvas, (m, y), (w - m, y), (225, 225, 225))
    _line(canvas, (m, h - m), (w - m, h - m), (0, 0, 0))
    _line(canvas, (m, m), (m, h - m), (0, 0, 0))
    ranges = {}
    n = len(history)
    for key in keys:
        vals = np.array([r.get(key, 0.0) for r in history], dtype=np.float64)
        if n == 0 or not np.isfinite(vals).all() or not vals.any():
            continue
        lo, hi = float(vals.min()), float(vals.max())
        ranges[key] = (lo, hi)
        scaled = (vals - lo) / (hi - lo) if hi > lo else np.full_like(vals, 0.5)
        k = max(1, n // 20)
        smooth = np.convolve(scaled, np.ones(k) / k, mode="valid")
        xs = m + (np.arange(n) / max(n - 1, 1)) * (w - 2 * m)
        color = _CURVE_COLORS.get(key, (100, 100, 100))
        light = tuple(int(c + (255 - c) * 0.6) for c in color)
        pts = list(zip(xs, m + (1 - scaled) * (h - 2 * m)))
        for a, b in zip(pts[:-1], pts[1:]):
            _line(canvas, a, b, light)
        sx = xs[k - 1:] if len(smooth) == n - k + 1 else xs[: len(smooth)]
        pts = list(zip(sx, m + (1 - smooth) * (h - 2 * m)))
        for a, b in zip(pts[:-1], pts[1:]):
            _line(canvas, a, b, color, width=2)
        if len(pts) == 1:
            _line(canvas, pts[0], pts[0], color, width=3)
    return canvas, ranges


def turntable_cameras(cfg, scene, n: int):
    """An orbit of n views around the ring's centre at the report elevation, the ring's size."""
    from gendistill.splat_edit.edit_inputs import scene_radius

    c = cfg.cameras  # resolved by the editor: concrete centre and radius
    center = torch.tensor(c.center, dtype=torch.float64)
    radius = c.radius or c.radius_factor * scene_radius(scene)
    elevation = cfg.report.elevation_deg if cfg.report.elevation_deg is not None else sum(c.elevation_range) / 2
    return center, orbit_path(center, radius, n, elevation_deg=elevation, fov_deg=c.fov_deg,
                              width=c.width or 512, height=c.height or 512, up=c.up)


@torch.no_grad()
def _render_pairs(editor, cameras, chunk: int = 8) -> dict[str, Tensor]:
    """Before (original scene) and after renders [F,H,W,3] and part coverages [F,H,W]."""
    out = {"before": [], "after": [], "cov_before": [], "cov_after": []}
    original = editor.original_part()
    for s in range(0, len(cameras), chunk):
        cams = cameras[list(range(s, min(s + chunk, len(cameras))))]
        rgb, cov, _ = editor.render(cams, original)
        out["before"].append(rgb.clamp(0, 1).cpu())
        out["cov_before"].append(cov.cpu())
        rgb, cov, _ = editor.render(cams)
        out["after"].append(rgb.clamp(0, 1).cpu())
        out["cov_after"].append(cov.cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def psnr_outside(before: Tensor, after: Tensor, cov_before: Tensor, cov_after: Tensor, threshold: float) -> dict:
    """PSNR (dB, capped at 100 for identical images) over pixels the part covers by less than
    `threshold` in both renders. before/after [F,H,W,3], coverages [F,H,W]."""
    outside = (cov_before < threshold) & (cov_after < threshold)
    n = int(outside.sum())
    if n == 0:
        return {"psnr_outside_db": None, "outside_pixels": 0, "mse_outside": None}
    mse = float(((before - after) ** 2)[outside].mean())
    psnr = 100.0 if mse <= 1e-10 else min(100.0, 10.0 * math.log10(1.0 / mse))
    return {"psnr_outside_db": psnr, "outside_pixels": n, "mse_outside": mse}


def _part_colors(editor, renders: dict) -> dict:
    """Mean DC colour of the part's Gaussians, and mean rendered colour where the part covers > 0.5."""
    s = editor.scene
    before = s.colors_rgb()[editor.mask].mean(0)
    p = editor.params
    after = sh_to_rgb(p["sh0"][:, 0].detach()).clamp(0, 1).mean(0) if len(p["sh0"]) else torch.full((3,), float("nan"))

    def rendered(rgb, cov):
        m = cov > 0.5
        return rgb[m].mean(0).tolist() if bool(m.any()) else None

    return {"before": [round(float(v), 4) for v in before], "after": [round(float(v), 4) for v in after],
            "rendered_before": rendered(renders["before"], renders["cov_before"]),
            "rendered_after": rendered(renders["after"], renders["cov_after"])}


# ---------------------------------------------------------------------- CLIP
def _clip_preprocess(images: Tensor, folder: Path, size: int) -> Tensor:
    """[B,H,W,3] in [0,1] -> [B,3,size,size] normalised as the model's processor (OpenAI's by default)."""
    mean, std = _CLIP_MEAN, _CLIP_STD
    cfg_file = folder / "preprocessor_config.json"
    if cfg_file.is_file():
        pc = json.loads(cfg_file.read_text())
        mean, std = tuple(pc.get("image_mean", mean)), tuple(pc.get("image_std", std))
    x = F.interpolate(images.permute(0, 3, 1, 2).float(), size=(size, size), mode="bicubic", align_corners=False,
                      antialias=True).clamp(0, 1)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@torch.no_grad()
def clip_scores(model_path: str, before: Tensor, after: Tensor, source_prompt: str, edit_prompt: str) -> dict:
    """CLIP similarity (cosine of edited views and the edit prompt) and CLIP directional similarity
    (cosine of the image change and the text change), averaged over views [F,H,W,3]."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    folder = Path(model_path)
    size = int(model.config.vision_config.image_size)

    def image_emb(x):
        feats = model.get_image_features(pixel_values=_clip_preprocess(x, folder, size))
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        return F.normalize(feats, dim=-1)

    def text_emb(texts):
        tok = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt",
                        max_length=min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings))
        feats = model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok.get("attention_mask"))
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        return F.normalize(feats, dim=-1)

    ib, ia = image_emb(before), image_emb(after)
    ts, te = text_emb([source_prompt or "", edit_prompt])
    sim = (ia @ te).mean()
    d_img = F.normalize(ia - ib, dim=-1)
    d_txt = F.normalize(te - ts, dim=-1)
    direction = (d_img @ d_txt).mean()
    return {"clip_similarity": float(sim), "clip_directional_similarity": float(direction), "clip_model": model_path,
            "clip_views": len(after)}


# ---------------------------------------------------------------------- report
def _frames_side_by_side(before: Tensor, after: Tensor, gap: int = 2) -> np.ndarray:
    b, a = to_uint8(before), to_uint8(after)
    sep = np.full((*b.shape[:2], gap, 3), 255, np.uint8)
    return np.concatenate([b, sep, a], axis=2)


def write_report(out: Path, cfg, editor, summary: dict, t_start: float) -> dict:
    """Render the before/after views, write the grid, turntable, loss curve, metrics and report.html;
    returns the completed summary (also rewritten to summary.json)."""
    out = Path(out)
    scene = editor.scene
    n = max(cfg.report.turntable_frames, cfg.report.grid_views)
    _, cams = turntable_cameras(cfg, scene, n)
    renders = _render_pairs(editor, cams)
    pick = np.linspace(0, n, cfg.report.grid_views, endpoint=False).round().astype(int).tolist()
    grid = contact_sheet([renders["before"][i] for i in pick] + [renders["after"][i] for i in pick],
                         cols=len(pick))
    write_image(out / "before_after.png", grid)
    tt = np.linspace(0, n, cfg.report.turntable_frames, endpoint=False).round().astype(int).tolist()
    write_video(out / "turntable.mp4", _frames_side_by_side(renders["before"][tt], renders["after"][tt]),
                fps=cfg.report.fps)
    curve, ranges = loss_curve_image(editor.history)
    write_image(out / "loss_curve.png", curve)
    metrics = psnr_outside(renders["before"], renders["after"], renders["cov_before"], renders["cov_after"],
                           cfg.report.outside_threshold)
    metrics["mean_part_color"] = _part_colors(editor, renders)
    if cfg.report.clip_model is not None:
        metrics.update(clip_scores(cfg.report.clip_model, renders["before"], renders["after"], cfg.prompt,
                                   cfg.edit_prompt))
    summary = dict(summary)
    summary["metrics"] = metrics
    summary["loss_ranges"] = ranges
    summary["seconds"] = {**summary["seconds"], "total": time.perf_counter() - t_start}
    summary["files"] = _files(out, cfg.part)
    write_summary(out, summary)
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(_html(summary, ranges))
    return summary


def _files(out: Path, part: str) -> dict:
    names = {"scene": "edited.ply", "mask": f"masks3d/{part}.npy", "grid": "before_after.png",
             "turntable": "turntable.mp4", "loss_curve": "loss_curve.png", "summary": "summary.json",
             "config": "config.yaml", "segmentation": "segment/contact_sheet.png",
             "label_field": "segment/labelled.ply"}
    files = {k: v for k, v in names.items() if (out / v).exists() or k == "summary"}
    kinds = {"render": 0, "mask": 1, "target": 2}
    found = (out / "anchors").glob("*.png") if (out / "anchors").is_dir() else []
    anchors = sorted((p.relative_to(out).as_posix() for p in found),
                     key=lambda s: (s.rsplit("_", 1)[0], kinds.get(s.rsplit("_", 1)[-1][:-4], 3)))
    files["anchors"] = anchors
    return files


def _swatch(rgb) -> str:
    if rgb is None:
        return "n/a"
    r, g, b = (int(round(255 * min(max(float(v), 0.0), 1.0))) for v in rgb)
    vals = ", ".join(f"{float(v):.3f}" for v in rgb)
    return f'<span class="sw" style="background:rgb({r},{g},{b})"></span> ({vals})'


def _html(summary: dict, ranges: dict) -> str:
    e = html.escape
    f = summary["files"]
    m = summary["metrics"]
    g = summary["gaussians"]
    sec = summary["seconds"]
    rows = [
        ("part", e(summary["part"])), ("prompt", e(summary["prompt"] or "")), ("edit prompt", e(summary["edit_prompt"])),
        ("guidance", e(f"{summary['guidance']['kind']}: {summary['guidance']['model']}")),
        ("steps", f"{summary['steps']} of {summary['steps_planned']}" + (" (interrupted)" if summary["interrupted"] else "")),
        ("seconds", f"total {sec['total']:.1f}, setup {sec['setup']:.1f}, optimisation {sec['optimisation']:.1f} "
                    f"({sec['per_step']:.3f} per step)"),
        ("Gaussians", f"input {g['input']}, output {g['output']}; part {g['part_input']} &rarr; {g['part_output']}: "
                      f"changed {g['changed']}, added {g['added']}, removed {g['removed']} "
                      f"(background after the anchor edit: {g['removed_background']}); outside untouched {g['outside']}"),
        ("PSNR outside the part", "n/a" if m["psnr_outside_db"] is None else f"{m['psnr_outside_db']:.2f} dB "
                                  f"over {m['outside_pixels']} pixels"),
        ("mean part colour (Gaussians)", f"before {_swatch(m['mean_part_color']['before'])}, "
                                         f"after {_swatch(m['mean_part_color']['after'])}"),
        ("mean part colour (rendered)", f"before {_swatch(m['mean_part_color']['rendered_before'])}, "
                                        f"after {_swatch(m['mean_part_color']['rendered_after'])}"),
    ]
    if "clip_similarity" in m:
        rows.append(("CLIP similarity", f"{m['clip_similarity']:.4f}"))
        rows.append(("CLIP directional similarity", f"{m['clip_directional_similarity']:.4f}"))
    table = "\n".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    legend = " &nbsp; ".join(
        f'<span class="sw" style="background:rgb{_CURVE_COLORS[k]}"></span> {k} [{lo:.4g}, {hi:.4g}]'
        for k, (lo, hi) in ranges.items())
    anchors = ""
    if f["anchors"]:
        cells = "".join(f'<figure><img src="{e(p)}" alt="{e(p)}"><figcaption>{e(Path(p).stem)}</figcaption></figure>'
                        for p in f["anchors"])
        anchors = f"<h2>Anchor views: render (prior removed), part mask, 2D edit target</h2><div class='row'>{cells}</div>"
    if "segmentation" in f:
        anchors += (f"<h2>3D-GALP segmentation (label masks over the views)</h2>"
                    f'<img src="{e(f["segmentation"])}" alt="segmentation">')
    links = " &middot; ".join(f'<a href="{e(v)}">{e(v)}</a>' for k, v in f.items() if k != "anchors")
    viewer = (f"gendistill view {shlex.quote(str(summary['scene']))} edited.ply "
              f"--masks3d masks3d   # run in this folder; open the address it prints")
    turntable = (f'<video src="{e(f["turntable"])}" controls loop autoplay muted></video>' if "turntable" in f else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>gendistill edit: {e(summary['part'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1100px; }}
img, video {{ image-rendering: pixelated; max-width: 100%; min-width: 256px; border: 1px solid #ccc; }}
table {{ border-collapse: collapse; }} th, td {{ text-align: left; padding: 4px 10px; border-bottom: 1px solid #eee; }}
.sw {{ display: inline-block; width: 1em; height: 1em; border: 1px solid #888; vertical-align: middle; }}
.row {{ display: flex; flex-wrap: wrap; gap: 8px; }} figure {{ margin: 0; }} figcaption {{ font-size: 0.8em; }}
.row img {{ min-width: 128px; width: 160px; }}
</style></head><body>
<h1>Part edit: {e(summary['part'])} &mdash; &ldquo;{e(summary['edit_prompt'])}&rdquo;</h1>
<table>{table}</table>
<h2>Before (top) and after (bottom)</h2>
<img src="{e(f['grid'])}" alt="before and after">
<h2>Turntable: before | after</h2>
{turntable}
{anchors}
<h2>Loss</h2>
<p>{legend} (each series scaled to its own range)</p>
<img src="{e(f['loss_curve'])}" alt="loss curve">
<h2>Files</h2><p>{links}</p>
<h2>Look at it from every side</h2><p><code>{e(viewer)}</code></p>
</body></html>
"""
