"""INRIA 3DGS PLY: the reference layout every tool reads and writes.

The layout is the one of the INRIA code (`GaussianModel.save_ply`): one `vertex` element,
binary little-endian float32 properties in the order

    x y z nx ny nz f_dc_0 f_dc_1 f_dc_2 f_rest_0 .. f_rest_{3(K-1)-1} opacity scale_0..2 rot_0..3

with `f_rest_*` channel-major (all higher-order coefficients of R, then of G, then of B),
`opacity` a logit, `scale_*` logs, `rot_*` a raw wxyz quaternion. RoMaP's label field
(`obj_dc_*`, `obj_rest_*`, same layout, its own degree) and `certainty` follow, then any other
per-vertex property (`extras`, e.g. the demo scene's integer `part`). Header comments are kept
(`comments`); comments of the form `key: value` read back as `metadata()`.

Read and written with plyfile rather than gsply: these files carry RoMaP's label field, certainty
and arbitrary extra properties, which gsply's fixed 3DGS layouts drop.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
from plyfile import PlyData, PlyElement

from gendistill.core.io import atomic_path
from gendistill.core.scene import _NORMALS, _REQUIRED, _RESERVED_PREFIXES, GaussianScene, SceneFormatError

__all__ = ["read_ply", "write_ply", "check_ply_header"]

_REST_COUNTS = {0: 0, 9: 1, 24: 2, 45: 3}  # number of f_rest_* -> SH degree
# numpy dtype kind+size -> PLY type written for extras; int64/uint64 are narrowed (range-checked)
_EXTRA_DTYPES = {"u1": "u1", "i1": "i1", "u2": "u2", "i2": "i2", "u4": "u4", "i4": "i4",
                 "i8": "i4", "u8": "u4", "b1": "u1", "f2": "f4", "f4": "f4", "f8": "f8"}
# numpy dtype read from a file -> torch dtype (torch lacks wide unsigned ints: widen)
_TORCH_FROM_NP = {"u1": torch.uint8, "i1": torch.int8, "u2": torch.int32, "i2": torch.int16,
                  "u4": torch.int64, "i4": torch.int32, "f4": torch.float32, "f8": torch.float64}


_TYPE_BYTES = {"char": 1, "int8": 1, "uchar": 1, "uint8": 1, "short": 2, "int16": 2, "ushort": 2, "uint16": 2,
               "int": 4, "int32": 4, "uint": 4, "uint32": 4, "float": 4, "float32": 4, "double": 8, "float64": 8}


def check_ply_header(path: Path) -> None:
    """Refuse a PLY whose header does not end within 64 KiB, or whose element counts need more
    bytes than the file holds, before a reader allocates arrays of that length. A binary row takes
    at least its scalar properties and list lengths; an ASCII row two characters a property."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    end = head.find(b"end_header")
    if not head.startswith(b"ply"):
        return  # plyfile names what is wrong
    if end < 0:
        raise SceneFormatError(f"{path}: the PLY header has no end_header in its first 64 KiB (damaged or truncated)")
    body = os.path.getsize(path) - (end + len(b"end_header\n"))
    ascii_file, elements = b"format ascii" in head[:end], []
    for line in head[:end].decode("latin-1").splitlines():
        tok = line.split()
        if len(tok) == 3 and tok[0] == "element" and tok[2].isdigit():
            elements.append([tok[1], int(tok[2]), 0])
        elif len(tok) >= 3 and tok[0] == "property" and elements:
            size = _TYPE_BYTES.get(tok[2] if tok[1] == "list" else tok[1], 1)
            elements[-1][2] += 2 if ascii_file else size
    need = sum(count * row for _, count, row in elements)
    if need > body:
        claims = ", ".join(f"{count:,} {name}" for name, count, _ in elements)
        raise SceneFormatError(f"{path}: the header claims {claims}, which need at least {need:,} bytes; the "
                               f"file holds {body:,} after its header (truncated, or a wrong count)")


def read_ply(path: str | os.PathLike) -> GaussianScene:
    """Read an INRIA 3DGS PLY (binary or ASCII; written by INRIA's code, gsplat, SuperSplat, RoMaP).

    Raises `SceneFormatError` naming the file and the problem: not a PLY, truncated, no
    `vertex` element, a missing required property, an f_rest_* count other than 0/9/24/45,
    NaN or Inf values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such scene file")
    check_ply_header(path)
    try:
        ply = PlyData.read(str(path))
    except Exception as e:  # plyfile raises several types for header / body problems
        msg = str(e)
        if "expected 'ply'" in msg:
            problem = "not a PLY file (it does not start with 'ply')"
        elif "end-of-file" in msg and type(e).__name__ == "PlyElementParseError":
            problem = f"truncated file ({msg})"
        else:
            problem = f"unreadable PLY ({type(e).__name__}: {msg})"
        raise SceneFormatError(f"{path}: {problem}") from None
    if "vertex" not in ply:
        names = [el.name for el in ply.elements]
        raise SceneFormatError(f"{path}: no 'vertex' element (elements: {names})")
    data = ply["vertex"].data
    present = list(data.dtype.names or ())
    if "packed_position" in present or "chunk" in ply:
        raise SceneFormatError(f"{path}: a compressed (SuperSplat / PlayCanvas) PLY; read it with "
                               "GaussianScene.load or gendistill.core.formats.compressed_ply")
    for name in _REQUIRED:
        if name not in present:
            raise SceneFormatError(f"{path}: required vertex property '{name}' is missing "
                                   f"(found: {' '.join(present)})")
    n = len(data)

    def numbered(prefix: str) -> list[str]:
        found = sorted((int(m.group(1)), p) for p in present if (m := re.fullmatch(prefix + r"_(\d+)", p)))
        idx = [i for i, _ in found]
        if idx != list(range(len(idx))):
            raise SceneFormatError(f"{path}: properties {prefix}_* are not numbered 0..{len(idx) - 1} ({idx})")
        return [p for _, p in found]

    # The usual file is all float32: its rows, viewed as an [N, P] table (no copy; plyfile maps the
    # file), give every block in one row-wise gather. Other files are read column by column.
    column = {name: j for j, name in enumerate(present)}
    all_f4 = all(data.dtype.fields[p][0] == np.dtype("<f4") for p in present)
    table = np.asarray(data).view("<f4").reshape(n, len(present)) if all_f4 and n else None

    def floats(names: list[str]) -> np.ndarray:
        """[N, len(names)] float32, NaN / Inf refused naming the property."""
        if table is not None:
            out = table[:, [column[name] for name in names]]
        else:
            out = np.empty((n, len(names)), dtype=np.float32)
            for j, name in enumerate(names):
                col = np.asarray(data[name])
                if col.dtype.kind not in "fiu":
                    raise SceneFormatError(f"{path}: property '{name}' has non-numeric type {col.dtype}")
                out[:, j] = col
        if not np.isfinite(out.sum(axis=0, dtype=np.float64)).all():  # float64: finite floats never overflow
            for j, name in enumerate(names):
                bad = int((~np.isfinite(out[:, j])).sum())
                if bad:
                    raise SceneFormatError(f"{path}: property '{name}' has {bad} NaN/Inf value(s)")
        return out

    def sh_block(dc_prefix: str, rest_prefix: str) -> torch.Tensor:
        rest = numbered(rest_prefix)
        if len(rest) not in _REST_COUNTS:
            raise SceneFormatError(f"{path}: {len(rest)} {rest_prefix}_* properties; an SH degree 0-3 "
                                   f"layout has 0, 9, 24 or 45")
        k = len(rest) // 3 + 1
        # channel-major rest (all R, then G, then B) gathered coefficient-major: [N, K * 3] -> [N, K, 3]
        order = [f"{dc_prefix}_{c}" for c in range(3)] + [rest[c * (k - 1) + i] for i in range(k - 1) for c in range(3)]
        return torch.from_numpy(floats(order).reshape(n, k, 3))

    known = set(_REQUIRED) | set(_NORMALS)
    means = torch.from_numpy(floats(["x", "y", "z"]))
    sh = sh_block("f_dc", "f_rest")
    known |= {p for p in present if p.startswith("f_rest_")}
    label_sh = None
    if any(p.startswith("obj_dc_") or p.startswith("obj_rest_") for p in present):
        for name in ("obj_dc_0", "obj_dc_1", "obj_dc_2"):
            if name not in present:
                raise SceneFormatError(f"{path}: label field property '{name}' is missing")
        label_sh = sh_block("obj_dc", "obj_rest")
        known |= {p for p in present if p.startswith("obj_dc_") or p.startswith("obj_rest_")}
    certainty = None
    if "certainty" in present:
        certainty = torch.from_numpy(floats(["certainty"])[:, 0].copy())
        known.add("certainty")
    extras = {}
    for name in present:
        if name in known:
            continue
        if name.startswith(_RESERVED_PREFIXES) or name == "certainty":
            raise SceneFormatError(f"{path}: unexpected property '{name}' (not part of the 3DGS layout)")
        col = np.asarray(data[name])
        if col.dtype.kind not in "fiu":
            raise SceneFormatError(f"{path}: property '{name}' is a list or non-numeric ({col.dtype}); "
                                   "only scalar per-vertex properties are supported")
        key = col.dtype.kind + str(col.dtype.itemsize)
        t = torch.from_numpy(np.ascontiguousarray(col.astype(col.dtype.newbyteorder("="))))
        extras[name] = t.to(_TORCH_FROM_NP.get(key, torch.float32))
    return GaussianScene(
        means=means,
        quats=torch.from_numpy(floats([f"rot_{i}" for i in range(4)])),
        log_scales=torch.from_numpy(floats([f"scale_{i}" for i in range(3)])),
        opacity_logits=torch.from_numpy(floats(["opacity"])[:, 0].copy()),
        sh=sh, label_sh=label_sh, certainty=certainty, extras=extras,
        comments=list(ply.comments),
    )


def write_ply(scene: GaussianScene, path: str | os.PathLike) -> Path:
    """Write INRIA 3DGS binary little-endian PLY, atomically; returns the path.

    Normals are written as zeros. Label SH, certainty and extras follow the INRIA properties.
    NaN / inf values are refused (ValueError naming the properties) before anything is written.
    """
    path = Path(path)
    n = len(scene)

    def np32(t: torch.Tensor) -> np.ndarray:
        return t.detach().to("cpu", torch.float32).numpy().reshape(n, -1)

    def rest_cols(sh: torch.Tensor) -> np.ndarray:  # [N, K, 3] -> channel-major [N, 3(K-1)]
        return np32(sh[:, 1:].transpose(1, 2))

    blocks: list[tuple[list[str], np.ndarray]] = []  # (names, [N, len(names)] array)
    add = lambda names, arr: blocks.append((names, arr))  # noqa: E731
    add(["x", "y", "z"], np32(scene.means))
    add(_NORMALS, np.zeros((n, 3), np.float32))
    add([f"f_dc_{i}" for i in range(3)], np32(scene.sh[:, 0]))
    add([f"f_rest_{i}" for i in range(3 * (scene.sh.shape[1] - 1))], rest_cols(scene.sh))
    add(["opacity"], np32(scene.opacity_logits))
    add([f"scale_{i}" for i in range(3)], np32(scene.log_scales))
    add([f"rot_{i}" for i in range(4)], np32(scene.quats))
    if scene.label_sh is not None:
        add([f"obj_dc_{i}" for i in range(3)], np32(scene.label_sh[:, 0]))
        add([f"obj_rest_{i}" for i in range(3 * (scene.label_sh.shape[1] - 1))], rest_cols(scene.label_sh))
    if scene.certainty is not None:
        add(["certainty"], np32(scene.certainty))
    taken = {name for names, _ in blocks for name in names}
    for key, t in scene.extras.items():
        if key in taken:
            raise ValueError(f"extra property {key!r} clashes with a 3DGS property")
        arr = t.detach().cpu().numpy()
        kind = arr.dtype.kind + str(arr.dtype.itemsize)
        target = np.dtype(_EXTRA_DTYPES.get(kind, "f4"))
        if target.kind in "iu" and arr.size:
            info = np.iinfo(target)
            if arr.min() < info.min or arr.max() > info.max:
                raise ValueError(f"extra property {key!r} has values outside the range of PLY type {target}")
        add([key], arr.astype(target).reshape(n, 1))
    bad = {name: int((~np.isfinite(col)).sum()) for names, arr in blocks if arr.dtype.kind == "f"
           and not np.isfinite(arr.sum(axis=0, dtype=np.float64)).all() for name, col in zip(names, arr.T)}
    bad = {name: count for name, count in bad.items() if count}
    if bad:  # load_ply refuses them: never write a file our own reader rejects
        raise ValueError(f"{path}: not written, NaN/inf values in " + ", ".join(f"{k} ({v})" for k, v in bad.items()))
    dtype = np.dtype([(name, arr.dtype.newbyteorder("<")) for names, arr in blocks for name in names])
    if all(arr.dtype == np.float32 for _, arr in blocks):  # the usual file: one [N, P] table, row-wise writes
        data = np.concatenate([arr for _, arr in blocks], axis=1).astype("<f4", copy=False).view(dtype).reshape(n)
    else:
        data = np.empty(n, dtype=dtype)
        for names, arr in blocks:
            for name, col in zip(names, arr.T):
                data[name] = col
    el = PlyElement.describe(data, "vertex")
    ply = PlyData([el], text=False, byte_order="<", comments=list(scene.comments))
    with atomic_path(path) as tmp:
        ply.write(str(tmp))
    return path
