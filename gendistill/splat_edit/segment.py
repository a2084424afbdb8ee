"""`gendistill segment`: 3D part masks of a splat scene with 3D-GALP (RoMaP), from a mask folder or
the attention maps of a diffusers pipeline.

    gendistill segment scene.ply --parts nose,hat --masks DIR --out OUT
    gendistill segment scene.ply --parts nose,hat --attention-model PATH \
        --prompt "a snowman with a nose and a hat" --out OUT [--capture romap|ours] [--refine cascadepsp]

The attention model may be an SD3-style transformer pipeline (capture "romap", RoMaP's, by default)
or any text-conditioned UNet2DConditionModel pipeline, latent or pixel space (capture "ours").

Writes OUT/labelled.ply (the scene with its label field: obj_dc_*, obj_rest_*, certainty),
OUT/masks3d/<part>.npy (bool, one entry per Gaussian in input order), OUT/overlays/<view>.png
(the label masks over the RGB render of every view) and OUT/contact_sheet.png.

`add_parser` only uses argparse; the heavy modules load inside `run`.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Sequence

__all__ = ["add_parser", "run", "segment", "segment_cameras", "lift_part"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `segment` command to an argparse sub-parser collection."""
    p = subparsers.add_parser("segment", help="3D part masks of a splat scene (RoMaP 3D-GALP label field)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("scene", help="INRIA 3DGS .ply file")
    p.add_argument("--parts", required=True, help="comma-separated part names, e.g. nose,hat (earlier parts win "
                                                  "overlapping pixels)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--masks", help="mask folder: transforms.json (or a COLMAP model) + masks/<part>/<view>.png")
    src.add_argument("--attention-model", help="diffusers pipeline (local folder or hub id) for attention masks")
    p.add_argument("--prompt", help="prompt naming every part (with --attention-model)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=600, help="3D-GALP steps (paper: 600)")
    p.add_argument("--sh-degree", type=int, default=3, choices=[0, 1, 2, 3], help="label SH degree")
    p.add_argument("--threshold", type=float, default=1.0, help="summed |label - part colour| below which a "
                                                                "Gaussian belongs to the part")
    p.add_argument("--views", type=int, default=24, help="rendered views with --attention-model")
    p.add_argument("--size", type=int, default=512, help="view size in pixels with --attention-model")
    p.add_argument("--temperatures", default=None, help="attention softmax temperature, one or one per part "
                                                         "(default: 0.2 with --capture romap, 1.0 with ours)")
    p.add_argument("--capture", default="auto", choices=["auto", "romap", "ours"],
                   help="attention capture: romap (RoMaP's, the default for SD3 transformers) or ours (the default "
                        "for UNets)")
    p.add_argument("--capture-size", type=int, default=None, help="image size the attention model sees (default: "
                                                                  "512 for romap, the model's native size for ours)")
    p.add_argument("--refine", default=None, help="attention mask refiner: cascadepsp or module:function "
                                                  "(refine(image [3, H, W], mask [H, W]) -> mask)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", help="render backend: auto, cpu, torch, gsplat")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(run=run)
    return p


def _parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"--parts must name at least one part, got {text!r}")
    bad = [p for p in parts if "/" in p or "\\" in p or p in (".", "..")]
    if bad:
        raise ValueError(f"part names are used as file names and cannot contain slashes: {bad}")
    if len(set(parts)) != len(parts):
        raise ValueError(f"--parts lists a part twice: {parts}")
    return parts


def segment_cameras(scene, n: int = 24, size: int = 512, fov_deg: float = 45.0):
    """Two orbit rings (half at 10, half at 40 degrees elevation) framing the scene's bounds, around
    its `up:` axis (metadata comment, default +z)."""
    import torch

    from gendistill.core.cameras import Cameras, orbit_path

    axes = {"x": 0, "y": 1, "z": 2}
    up_text = scene.metadata().get("up", "+z").strip().lower()
    up = torch.zeros(3, dtype=torch.float64)
    sign = -1.0 if up_text.startswith("-") else 1.0
    up[axes.get(up_text.lstrip("+-"), 2)] = sign
    lo, hi = scene.bbox(quantile=0.01)
    center = ((lo + hi) / 2).double()
    radius = 1.15 * float((hi - lo).norm()) / 2 / math.sin(math.radians(fov_deg) / 2)
    half = max(1, n // 2)
    rings = [orbit_path(center, radius, half, elevation_deg=10.0, fov_deg=fov_deg, width=size, height=size, up=up)]
    if n - half > 0:
        rings.append(orbit_path(center, radius, n - half, elevation_deg=40.0, fov_deg=fov_deg, width=size,
                                height=size, up=up, start_deg=180.0 / max(1, n - half)))
    return Cameras.cat(rings)


def segment(scene_path: str | Path, parts: Sequence[str], out: str | Path, *, masks_dir: str | Path | None = None,
            attention_model=None, prompt: str | None = None, config=None, views: int = 24, size: int = 512,
            temperatures: float | Sequence[float] | None = None, attention_options: dict | None = None,
            device: str | None = None, progress: bool = True) -> dict:
    """Segment `parts` of a scene into 3D masks and write the outputs under `out` (see the module doc).

    Exactly one of `masks_dir` and `attention_model` (with `prompt`) gives the 2D masks; `config`
    is a `GALPConfig`; `attention_options` go to the "attention" mask source (`masks_from_attention`:
    capture, resolution, refine, output, background, romap options, ...). Returns {"ply": path,
    "masks3d": {part: path}, "overlays": [paths], "contact_sheet": path, "counts": {part: number of
    Gaussians}}.
    """
    import numpy as np
    from tqdm.auto import tqdm

    from gendistill.core.io import atomic_path
    from gendistill.core.runtime import resolve_device
    from gendistill.core.media import contact_sheet, write_image
    from gendistill.core.scene import GaussianScene
    from gendistill.splat_edit.galp import GALPConfig, train_label_field
    from gendistill.splat_edit.part_masks import get_part_masks, render_views

    parts = list(parts)
    if (masks_dir is None) == (attention_model is None):
        raise ValueError("give exactly one mask source: a mask folder or an attention model")
    if attention_model is not None and not prompt:
        raise ValueError("--attention-model needs --prompt, a prompt that names every part")
    config = config or GALPConfig()
    device = resolve_device(device)
    out = Path(out)
    scene = GaussianScene.load(scene_path).to(device)
    if masks_dir is not None:
        pm = get_part_masks("files", scene, parts, path=masks_dir)
    else:
        cams = segment_cameras(scene, views, size)
        options = {"seed": config.seed, "backend": config.backend, **(attention_options or {})}
        pm = get_part_masks("attention", scene, parts, pipeline=attention_model, prompt=prompt, cameras=cams,
                            temperatures=temperatures, device=device, **options)
    field = train_label_field(scene, pm.cameras, pm.masks.to(device), parts, config, progress=progress)

    result = {"ply": field.to_scene().save_ply(out / "labelled.ply"), "masks3d": {}, "overlays": []}
    m3 = field.masks_3d().cpu().numpy()
    for i, p in enumerate(parts):
        path = out / "masks3d" / f"{p}.npy"
        with atomic_path(path) as tmp:
            np.save(tmp, m3[i])
        result["masks3d"][p] = path
    result["counts"] = {p: int(m3[i].sum()) for i, p in enumerate(parts)}

    images = pm.images if pm.images is not None else render_views(scene, pm.cameras, backend=config.backend)
    labels = field.render()  # [C, H, W, 3]
    m2 = field.masks_2d().any(dim=1, keepdim=True).permute(0, 2, 3, 1).to(labels)  # [C, H, W, 1]
    names = pm.cameras.names or [f"view_{i:03d}" for i in range(len(pm.cameras))]
    sheet = []
    for i in tqdm(range(len(pm.cameras)), desc="overlays", disable=not progress, leave=False):
        over = images[i].to(labels) * (1 - 0.6 * m2[i]) + 0.6 * m2[i] * labels[i].clamp(0, 1)
        path = out / "overlays" / f"{Path(names[i]).stem}.png"
        write_image(path, over)
        result["overlays"].append(path)
        sheet.append(over)
    result["contact_sheet"] = out / "contact_sheet.png"
    write_image(result["contact_sheet"], contact_sheet(sheet))
    return result


def lift_part(scene, source: str, part: str, *, views: int = 16, size: int = 256, config=None, **options):
    """[N] bool: the 3D mask of one part from a 2D mask source on `views` rendered views (`segment_cameras`)
    at `size` pixels, lifted by 3D-GALP (`config`: a `GALPConfig`). The viewer's "from text" is source
    "clipseg" with the part's phrase as `part`; its "SAM" is source "sam" with `selection=`."""
    from gendistill.splat_edit.galp import GALPConfig, train_label_field
    from gendistill.splat_edit.part_masks import get_part_masks

    pm = get_part_masks(source, scene, [part], cameras=segment_cameras(scene, views, size), **options)
    field = train_label_field(scene, pm.cameras.to(scene.device), pm.masks.to(scene.device), [part],
                              config or GALPConfig(), progress=False)
    return field.masks_3d()[0].cpu()


def run(args: argparse.Namespace) -> None:
    """Run `gendistill segment` from parsed arguments; prints where the outputs went."""
    from gendistill.splat_edit.galp import GALPConfig

    parts = _parts(args.parts)
    temps = None
    if args.temperatures is not None:
        try:
            temps = [float(t) for t in args.temperatures.split(",")]
        except ValueError:
            raise ValueError(f"--temperatures must be numbers separated by commas, got {args.temperatures!r}") from None
        if len(temps) not in (1, len(parts)):
            raise ValueError(f"--temperatures needs one value or one per part ({len(parts)}), got {len(temps)}")
    options = {"capture": args.capture, "resolution": args.capture_size, "refine": args.refine}
    config = GALPConfig(steps=args.steps, sh_degree=args.sh_degree, threshold=args.threshold, seed=args.seed,
                        backend=args.backend)
    res = segment(args.scene, parts, args.out, masks_dir=args.masks, attention_model=args.attention_model,
                  prompt=args.prompt, config=config, views=args.views, size=args.size,
                  temperatures=temps if temps is None or len(temps) > 1 else temps[0],
                  attention_options=options if args.attention_model else None, device=args.device,
                  progress=not args.no_progress)
    out = Path(args.out)
    print(f"labelled scene: {res['ply']}")
    for p, path in res["masks3d"].items():
        print(f"3D mask {p}: {path} ({res['counts'][p]} Gaussians)")
    print(f"overlays: {out / 'overlays'}/ ({len(res['overlays'])} views); contact sheet: {res['contact_sheet']}")

