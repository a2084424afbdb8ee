"""The `gendistill` command: `gendistill <command> ...`; also `python -m gendistill` and `accelerate launch -m gendistill`."""

from __future__ import annotations

import argparse
import os
import sys

from gendistill.plan import add_plan_parser, run_plan
from gendistill.splat_edit.edit_cli import add_edit_batch_parser, add_edit_parser, run_edit_command
from gendistill.splat_edit.segment import add_parser as add_segment_parser
from gendistill.video_distill.cli import add_finetune_parser, add_generate_parser


def _add_render(sub) -> None:
    p = sub.add_parser("render", help="render splat scenes to turntable videos, PNG frames and contact sheets")
    p.add_argument("scenes", nargs="+", help="scene files (.ply, .compressed.ply, .spz, .splat, gsplat .pt)")
    p.add_argument("--out", required=True, help="output folder; one subfolder per scene")
    p.add_argument("--path", default="orbit", choices=["orbit", "spiral"], help="generated camera path")
    p.add_argument("--cameras", default=None, help="transforms.json or COLMAP model instead of a generated path")
    p.add_argument("--frames", type=int, default=120, help="frames of a generated path")
    p.add_argument("--size", default=None, help="WIDTHxHEIGHT (default 512x512, or the camera file's size)")
    p.add_argument("--format", dest="fmt", default="mp4", choices=["mp4", "png", "both"])
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--fov", type=float, default=45.0, help="horizontal field of view of generated paths, degrees")
    p.add_argument("--elevation", type=float, default=20.0, help="elevation of generated paths, degrees")
    p.add_argument("--background", default="0,0,0", help="R,G,B in [0, 1]")
    p.add_argument("--backend", default="auto", help="render backend: auto, cpu, torch, gsplat")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(run=_run_render)


def _run_render(args) -> None:
    from gendistill.batch_render import RenderJob, parse_size, render_scenes

    try:
        background = tuple(float(v) for v in args.background.split(","))
        assert len(background) == 3
    except (ValueError, AssertionError):
        raise ValueError(f"--background must be R,G,B like 1,1,1, got {args.background!r}") from None
    size = parse_size(args.size) if args.size else (None if args.cameras else (512, 512))
    job = RenderJob(path=args.path, frames=args.frames, size=size, cameras_file=args.cameras, fmt=args.fmt,
                    fps=args.fps, fov_deg=args.fov, elevation_deg=args.elevation, background=background,
                    backend=args.backend)
    folders = render_scenes(args.scenes, args.out, job, device=args.device)
    from accelerate import PartialState

    if PartialState().is_main_process:
        for folder in folders:
            print(f"rendered {folder.name}: {folder}/")


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a splat scene between formats: INRIA PLY, compressed PLY, SPZ, "
                                       ".splat (gsplat checkpoints and SOG are read too)")
    p.add_argument("input", help="scene file; its format is found from its content")
    p.add_argument("output", help="file to write; its format from the suffix (.ply, .compressed.ply, .spz, .splat)")
    p.add_argument("--sh-degree", type=int, default=None, choices=[0, 1, 2, 3],
                   help="colour SH degree to write: higher orders dropped, missing ones zero (default: keep)")
    p.set_defaults(run=_run_convert)


def _run_convert(args) -> None:
    from gendistill.core.formats import read_scene, writable_format, write_scene

    try:
        fmt = writable_format(args.output)  # before reading a large input
    except ValueError as err:
        raise ValueError(f"output {err}") from None
    try:
        scene, _ = read_scene(args.input)
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"input {err}") from None
    if args.sh_degree is not None:
        scene = scene.with_sh_degree(args.sh_degree)
    for note in write_scene(scene, args.output):
        print(f"{args.output}: {note}", file=sys.stderr)
    print(f"wrote {args.output} ({fmt}, {len(scene):,} Gaussians, SH degree {scene.sh_degree})")


def _add_view(sub) -> None:
    p = sub.add_parser("view", help="look at splat scenes in a local web viewer (viser; offline)")
    p.add_argument("scenes", nargs="+", help="scene files (any format); the first is shown first")
    p.add_argument("--labels", default=None, help="labelled PLY (a `part` property or a label field) for the parts")
    p.add_argument("--masks3d", default=None, help="folder of <part>.npy 3D masks, instead of --labels")
    p.add_argument("--cameras", default=None, help="camera file to show as frustums (COLMAP, transforms.json, ...)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: other machines too)")
    p.add_argument("--port", type=int, default=8080, help="port; the next free one when it is in use")
    p.add_argument("--colour", default="", help="parts coloured from the start, comma-separated (e.g. hat)")
    p.add_argument("--out", default="selection", help="where \"save part\" writes masks3d/<part>.npy and labelled.ply")
    p.add_argument("--backend", default="auto", help="render backend of picking and the render panel")
    p.add_argument("--clipseg", default=None, help="CLIPSeg model folder: a \"select from text\" box (CLIPSeg masks "
                                                  "of rendered views, lifted by 3D-GALP)")
    p.add_argument("--sam", default=None, help="SAM model folder: a button that refines the selection (SAM prompted "
                                              "with it in rendered views, lifted by 3D-GALP)")
    p.add_argument("--lift", default="16,256,200", help="with --clipseg / --sam: views, view size and 3D-GALP steps")
    p.set_defaults(run=lambda args: view(args.scenes, labels=args.labels, masks3d=args.masks3d,
                                         cameras=args.cameras, host=args.host, port=args.port,
                                         coloured=[c for c in args.colour.split(",") if c], out=args.out,
                                         backend=args.backend, clipseg=args.clipseg, sam=args.sam, lift=args.lift))


def view(*args, clipseg=None, sam=None, lift="16,256,200", backend="auto", **kwargs) -> int:
    """The viewer, with 3D-GALP's label fields read and written, and CLIPSeg / SAM lifted by it (the
    plugins do not import each other)."""
    from gendistill.splat_edit.galp import GALPConfig, labelled_from_masks, masks_from_scene
    from gendistill.splat_edit.segment import lift_part
    from gendistill.viewer.view import view as serve

    try:
        views, size, steps = (int(v) for v in lift.split(","))
        assert views >= 1 and size >= 8 and steps >= 1
    except (ValueError, AssertionError):
        raise ValueError(f"--lift must be VIEWS,SIZE,STEPS (e.g. 16,256,200), got {lift!r}") from None
    for flag, folder in (("--clipseg", clipseg), ("--sam", sam)):
        if folder is not None and not os.path.isdir(folder):
            raise ValueError(f"{flag} {folder}: no such model folder")
    common = dict(views=views, size=size, config=GALPConfig(steps=steps, backend=backend), backend=backend)

    def from_text(scene, phrase: str):
        return lift_part(scene, "clipseg", phrase, model=clipseg, **common)

    def from_selection(scene, selection):
        return lift_part(scene, "sam", "selection", model=sam, selection=selection, box=True, **common)

    return serve(*args, read_label_field=masks_from_scene, write_labelled=labelled_from_masks, backend=backend,
                 from_text=from_text if clipseg else None, from_selection=from_selection if sam else None, **kwargs)


def live_edit_view(cfg):
    """The editor's step callback that feeds the live view (`viewer.port`; None without it): it starts
    the page at the first step and sends the part's Gaussians, the losses and the latest SDS view
    every `viewer.every` steps. `.close()` stops the page; `.live` is the `LiveView` once started."""
    if cfg.viewer.port is None:
        return None
    import torch

    from gendistill.core.render.sh import sh_to_rgb
    from gendistill.viewer.live import start_live_view
    from gendistill.viewer.view import gaussian_arrays

    def callback(editor, record) -> None:
        if callback.live is None:
            callback.live = start_live_view(editor.scene, editor.mask, host=cfg.viewer.host, port=cfg.viewer.port)
            print(f"live view: {callback.live.url}", file=sys.stderr, flush=True)
        if editor.step_count % cfg.viewer.every:
            return
        with torch.no_grad():
            p = editor.part_tensors()
            arrays = gaussian_arrays(p["means"], p["quats"], p["scales"], p["opacities"], sh_to_rgb(p["sh"][:, 0]))
            image = None
            if editor.last_views:
                rgb, _, _ = editor.render(editor.cameras[editor.last_views[:1]])
                image = (rgb[0].clamp(0, 1) * 255).round().byte().cpu().numpy()
        callback.live.update(editor.step_count, arrays, record, image)

    callback.live = None
    callback.close = lambda: callback.live.stop() if callback.live is not None else None
    return callback


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gendistill")
    except PackageNotFoundError:
        return "unknown"


def config_keys(cls) -> str:
    """One line per top-level key of a config dataclass: name, type and default (or "required")."""
    from dataclasses import MISSING, fields, is_dataclass

    lines = []
    for f in fields(cls):
        if is_dataclass(f.type) or (f.default_factory is not MISSING and is_dataclass(f.default_factory)):
            value = "section"
        elif f.default is not MISSING:
            value = f"default {f.default!r}" if f.default != "???" else "required"
        elif f.default_factory is not MISSING:
            value = f"default {f.default_factory()!r}"
        else:
            value = "required"
        kind = getattr(f.type, "__name__", str(f.type)).replace("typing.", "")
        lines.append(f"  {f.name:<28} {kind}, {value}")
    return "\n".join(lines)


# the config dataclass of each config-based command, for its help's key list
CONFIGS = {"edit": ("gendistill.splat_edit.edit_config", "EditConfig"),
           "finetune": ("gendistill.video_distill.finetune_config", "FinetuneConfig")}


def build_parser(key_lists: bool = True) -> argparse.ArgumentParser:
    """The `gendistill` parser; `key_lists`: list each config command's keys in its help (imports its
    config module: only worth it when help is asked for)."""
    parser = argparse.ArgumentParser(prog="gendistill", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gendistill {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_render(sub)
    _add_convert(sub)
    _add_view(sub)
    add_finetune_parser(sub)
    add_generate_parser(sub)
    add_segment_parser(sub)
    add_edit_parser(sub).set_defaults(run=lambda args: run_edit_command(args, live_edit_view))
    add_edit_batch_parser(sub)
    add_plan_parser(sub)
    for name in ("edit", "finetune"):  # plan this command line instead of running it
        sub.choices[name].add_argument("--dry-run", action="store_true",
                                       help="print `gendistill plan` for this command line (full size, no weights, "
                                            "no GPU) and exit")
    for name, p in sub.choices.items():  # the same conventions for every command
        p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
        p.add_argument("--debug", action="store_true", help="on error, the full traceback instead of one line")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        if name in CONFIGS or name == "plan":
            p.add_argument("--print-config", action="store_true", help="print the merged config as YAML and exit")
        if name in CONFIGS and key_lists:
            import importlib

            module, cls = CONFIGS[name]
            p.epilog = "config keys (top level; key=value overrides, dotted for sections):\n" + config_keys(
                getattr(importlib.import_module(module), cls))
            p.formatter_class = _Formatter
    return parser


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, and the epilog's key list kept as written."""


def _message(err: Exception) -> str:
    """The error's text on one line: no doubled quotes for a KeyError, control characters (a file name
    may hold them) escaped."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _check_device(name: str) -> None:
    import torch

    try:
        torch.device(name)
    except RuntimeError:  # torch's message names no flag
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {name!r}") from None


def main(argv: list[str] | None = None) -> int:
    import os

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(key_lists=any(a in ("-h", "--help") for a in argv)).parse_args(argv)
    if args.no_progress:
        os.environ["TQDM_DISABLE"] = "1"  # every tqdm bar, ours and the libraries'
    if getattr(args, "dry_run", False):
        args.json, args.gpu, args.gpu_memory, args.run = False, None, None, run_plan
    try:
        if getattr(args, "device", None) is not None:  # render, generate, segment: before anything loads
            _check_device(args.device)
        if getattr(args, "config", None) is not None:  # `plan` reads the file before loading it: check it first
            from gendistill.config import read_yaml

            read_yaml(args.config)
        if getattr(args, "print_config", False):
            from gendistill.config import to_yaml

            print(to_yaml(args.load_config(args)), end="")
            return 0
        code = args.run(args)
    except (ValueError, FileNotFoundError, KeyError, FloatingPointError) as err:
        if args.debug:
            raise
        print(f"gendistill {args.command}: error: {_message(err)}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
