"""Scene files in the formats users have: one reader and one writer per format, and detection.

| format | files | read | write | through |
|---|---|---|---|---|
| `ply` | INRIA 3DGS PLY, any SH degree, normals, extra properties | yes | yes | plyfile (`ply.py`) |
| `compressed-ply` | SuperSplat / PlayCanvas `*.compressed.ply` | yes | yes | gsply |
| `spz` | Niantic `.spz`, v1-v4 | yes | yes (v3) | gsply |
| `splat` | antimatter15 `.splat` | yes | yes | by hand / gsplat's `export_splats` |
| `gsplat-ckpt` | gsplat `simple_trainer` `ckpt_*.pt` | yes | no | torch.load |
| `sog` | PlayCanvas SOG (WebP images in a zip) | with `imagecodecs` | no | gsply |

    scene, notes = read_scene("point_cloud.ply")     # notes: what the format could not hold exactly
    write_scene(scene, "scene.spz")                  # the format from the suffix, or fmt="spz"

A file's format is found from its first bytes where a format's signature matches (so an SPZ named
`.ply` still reads as SPZ), else from its suffix; a file named for a format with a signature it
lacks is an error naming both. Other packages add formats with `@SCENE_FORMATS.register(name)` on
a `SceneFormat` (see `gendistill.registry`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gendistill.core.formats.gsplat_ckpt import is_torch_zip, read_gsplat_ckpt
from gendistill.core.formats.packed import (is_compressed_ply, is_sog, is_spz, read_compressed_ply, read_sog,
                                            read_spz, write_compressed_ply, write_spz)
from gendistill.core.formats.ply import read_ply, write_ply
from gendistill.core.formats.splat import read_splat, write_splat
from gendistill.core.scene import GaussianScene, SceneFormatError
from gendistill.registry import Registry, load_plugins

__all__ = ["SceneFormat", "SCENE_FORMATS", "detect_format", "read_scene", "write_scene", "format_for_path",
           "writable_format"]

logger = logging.getLogger("gendistill.formats")
_HEAD = 1 << 16  # bytes read to find a signature (a PLY header with many properties is long)


@dataclass(frozen=True)
class SceneFormat:
    """One file format: its suffixes, how to recognise it, read it and (if it can) write it.

    read(path) -> (scene, notes); write(scene, path) -> notes; notes are one line each about what
    the format could not hold exactly. sniff(first bytes) -> whether the file is of this format,
    None for a format without a signature (then the suffix decides)."""

    suffixes: tuple[str, ...]
    read: Callable[[Path], tuple[GaussianScene, list[str]]]
    write: Callable[[GaussianScene, Path], list[str]] | None
    sniff: Callable[[bytes], bool] | None
    signature: str = ""  # in words, for error messages


SCENE_FORMATS = Registry("scene format")
SCENE_FORMATS.register("compressed-ply")(SceneFormat(
    (".compressed.ply",), read_compressed_ply, write_compressed_ply, is_compressed_ply, "a PLY header with a chunk element"))
SCENE_FORMATS.register("ply")(SceneFormat(
    (".ply",), lambda path: (read_ply(path), []), lambda scene, path: write_ply(scene, path) and [],
    lambda head: head.startswith(b"ply") and not is_compressed_ply(head), "'ply' and a header"))
SCENE_FORMATS.register("spz")(SceneFormat((".spz",), read_spz, write_spz, is_spz, "gzip or NGSP magic bytes"))
SCENE_FORMATS.register("splat")(SceneFormat((".splat",), read_splat, write_splat, None))
SCENE_FORMATS.register("sog")(SceneFormat((".sog",), read_sog, None, is_sog, "a zip archive of WebP images"))
SCENE_FORMATS.register("gsplat-ckpt")(SceneFormat(
    (".pt", ".pth", ".ckpt"), read_gsplat_ckpt, None, is_torch_zip, "a torch zip archive"))


def format_for_path(path: str | os.PathLike) -> str | None:
    """The format whose suffix the path ends with (the longest match), or None."""
    name = Path(path).name.lower()
    matches = [(len(suf), fmt) for fmt, f in SCENE_FORMATS.items() for suf in f.suffixes if name.endswith(suf)]
    return max(matches)[1] if matches else None


def detect_format(path: str | os.PathLike) -> str:
    """The format of an existing scene file, from its signature, else its suffix."""
    load_plugins()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such scene file")
    with open(path, "rb") as f:
        head = f.read(_HEAD)
    by_suffix = format_for_path(path)
    for name, fmt in SCENE_FORMATS.items():
        if fmt.sniff is not None and fmt.sniff(head):
            return name
    if by_suffix is not None:
        fmt = SCENE_FORMATS[by_suffix]
        if fmt.sniff is None:
            return by_suffix
        raise SceneFormatError(f"{path}: named like a {by_suffix} file, but it does not start with "
                               f"{fmt.signature} (it starts with {head[:8]!r})")
    known = ", ".join(f"{n} ({' '.join(f.suffixes)})" for n, f in SCENE_FORMATS.items())
    raise SceneFormatError(f"{path}: not a scene file this package reads (starts with {head[:8]!r}); formats: {known}")


def read_scene(path: str | os.PathLike, fmt: str | None = None) -> tuple[GaussianScene, list[str]]:
    """Read a scene file; returns (scene, notes) and logs each note as a warning naming the file."""
    path = Path(path)
    name = fmt or detect_format(path)
    scene, notes = SCENE_FORMATS.get_entry(name).read(path)
    zero = scene.quats.norm(dim=1) < 1e-12  # a degenerate rotation renders as NaN: the identity instead
    if zero.any():
        scene.quats[zero] = scene.quats.new_tensor([1.0, 0.0, 0.0, 0.0])
        notes = notes + [f"{int(zero.sum())} zero rotation(s) read as the identity"]
    for note in notes:
        logger.warning("%s: %s", path, note)
    return scene, notes


def writable_format(path: str | os.PathLike, fmt: str | None = None) -> str:
    """The format `path` would be written in (`fmt`, or from its suffix); a ValueError naming the path
    and the writable formats when there is none. Cheap: ask it before long work."""
    load_plugins()
    name = fmt or format_for_path(path)
    writable = [n for n, f in SCENE_FORMATS.items() if f.write]
    if name not in writable:
        known = ", ".join(f"{n} ({' '.join(SCENE_FORMATS[n].suffixes)})" for n in writable)
        what = "no scene format has this suffix" if name is None else f"the {name} format cannot be written"
        raise ValueError(f"{path}: {what}; writable: {known}")
    return name


def write_scene(scene: GaussianScene, path: str | os.PathLike, fmt: str | None = None) -> list[str]:
    """Write `scene` atomically in format `fmt` (default: from the suffix); returns the notes."""
    return SCENE_FORMATS[writable_format(path, fmt)].write(scene, Path(path))
