"""`gendistill edit`: argparse only here; the editor and its heavy imports load when the command runs.

    gendistill edit --config configs/splat_edit/tiny_cpu.yaml scene=assets/scenes/snowman.ply part=hat \\
        prompt="a snowman with a hat" edit_prompt="a snowman with a gold hat" out=outputs/edit_tiny
"""

from __future__ import annotations

import argparse

__all__ = ["add_edit_parser", "run_edit_command", "load_edit_command_config"]


def add_edit_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `edit` command to an argparse subparsers object."""
    p = subparsers.add_parser(
        "edit", help="RoMaP part editing of a Gaussian-splat scene (3D mask, SLaMP anchors, regularized SDS)",
        description="Edit one part of a 3DGS scene with a text prompt. Settings come from the YAML config, then "
                    "key=value overrides; scene=, part=, edit_prompt= and out= are required (prompt= describes "
                    "the input). The run folder gets edited.ply, masks3d/, anchors/, before_after.png, "
                    "turntable.mp4, loss_curve.png, summary.json and report.html. Ctrl-C stops after the current "
                    "step and still writes a complete result.")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/splat_edit/tiny_cpu.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help='config overrides, e.g. scene=s.ply part=hat edit_prompt="a gold hat" out=runs/a steps=500')
    p.set_defaults(run=run_edit_command, load_config=load_edit_command_config)
    return p


def load_edit_command_config(args):
    """The merged EditConfig of this command line (`--print-config`, `--dry-run`)."""
    from gendistill.splat_edit.edit_config import load_edit_config

    return load_edit_config(args.config, args.overrides)


def run_edit_command(args) -> int:
    from gendistill.splat_edit.edit_config import load_edit_config
    from gendistill.splat_edit.editor import run_edit

    result = run_edit(load_edit_config(args.config, args.overrides), progress=not args.no_progress)
    print(f"edit: {result.summary['steps']} steps, outputs in {result.out}/")
    # an interrupted run wrote a complete result, but a scheduler must tell it from a finished one
    return {"SIGINT": 130, "SIGTERM": 143}.get(result.summary["interrupted"], 0)

