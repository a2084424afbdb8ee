"""`gendistill edit` and `gendistill edit-batch`: argparse only here; the editor and its heavy imports load
when the command runs.

    gendistill edit --config configs/splat_edit/tiny_cpu.yaml scene=assets/scenes/snowman.ply part=hat \\
        prompt="a snowman with a hat" edit_prompt="a snowman with a gold hat" out=outputs/edit_tiny
    gendistill edit-batch edits.csv --config configs/splat_edit/tiny_cpu.yaml steps=50  # see splat_edit/edit_batch.py
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_edit_parser", "run_edit_command", "load_edit_command_config", "add_edit_batch_parser",
           "run_edit_batch_command"]


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


def run_edit_command(args, step_callback=None) -> int:
    """`gendistill edit`; `step_callback(cfg)` may give a `callback(editor, record)` for every step
    (with a `close()`, called at the end): the command line's live view."""
    from gendistill.splat_edit.edit_config import load_edit_config
    from gendistill.splat_edit.editor import run_edit

    cfg = load_edit_config(args.config, args.overrides)
    callback = step_callback(cfg) if step_callback is not None else None
    try:
        result = run_edit(cfg, callback=callback, progress=not args.no_progress)
    finally:
        if callback is not None:
            callback.close()
    print(f"edit: {result.summary['steps']} steps, outputs in {result.out}/")
    # an interrupted run wrote a complete result, but a scheduler must tell it from a finished one
    return {"SIGINT": 130, "SIGTERM": 143}.get(result.summary["interrupted"], 0)


def add_edit_batch_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `edit-batch` command to an argparse subparsers object."""
    p = subparsers.add_parser(
        "edit-batch", help="many part edits from a CSV manifest, split across processes (accelerate launch, torchrun)",
        description="Run `gendistill edit` for every row of a CSV manifest. Columns: scene, part, edit_prompt, out "
                    "(required), prompt, overrides (key=value settings separated by spaces) and any config key "
                    "(e.g. steps, guidance.model); relative scene and out paths are relative to the manifest. "
                    "Every row is checked before any work. Under accelerate launch / torchrun the rows are dealt "
                    "out to the processes. A failing row is recorded and the others go on; rows whose "
                    "summary.json is complete are skipped (run again to resume). batch_summary.csv gets one line "
                    "per row. Exit code 0: all done; 1: some rows failed; 2: bad manifest or config; 130 / 143: "
                    "stopped by Ctrl-C / SIGTERM after the running edit wrote its result.")
    p.add_argument("manifest", metavar="MANIFEST.csv", help="the CSV manifest, one edit per row")
    p.add_argument("--config", required=True, help="YAML config for every row, e.g. configs/splat_edit/tiny_cpu.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides for every row (a row's columns and overrides cell come after them)")
    p.add_argument("--out", default=None, help="folder for batch_summary.csv (None: the manifest's folder)")
    p.set_defaults(run=run_edit_batch_command)
    p.__class__ = _Intermixed  # MANIFEST.csv --config C key=value ...
    return p


class _Intermixed(argparse.ArgumentParser):
    """Positionals on both sides of options: plain argparse fills the key=value list (with nothing) as soon
    as it has MANIFEST.csv, and then refuses the overrides after `--config C`."""

    _inside = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inside:  # parse_known_intermixed_args calls this itself, twice
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False

    def error(self, message):  # the intermixed parse lists the optional key=value list as missing too
        super().error(message.replace("MANIFEST.csv, key=value", "MANIFEST.csv"))


def run_edit_batch_command(args) -> int:
    from accelerate import PartialState

    from gendistill.splat_edit.edit_batch import batch_summary_path, exit_code, run_batch

    results = run_batch(args.manifest, args.config, args.overrides, progress=not args.no_progress, out=args.out,
                        debug=args.debug)
    code = exit_code(results)
    if PartialState().is_main_process:
        counts = {s: sum(r["status"] == s for r in results) for s in ("done", "skipped", "failed", "interrupted",
                                                                          "pending")}
        print(f"edit-batch: {len(results)} rows: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
              + f"; summary in {batch_summary_path(args.manifest, args.out)}")
        for r in results:
            if r["status"] in ("failed", "interrupted", "pending"):
                print(f"edit-batch: row {r['row']} ({r['scene']}, part {r['part']}) {r['status']}: {r['error']}",
                      file=sys.stderr)
        if code in (130, 143):
            print("edit-batch: stopped; the same command finishes the interrupted and pending rows", file=sys.stderr)
    return code
