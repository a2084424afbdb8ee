"""Write the interoperability fixtures of `tests/test_formats.py`: scene files written by other tools.

One small seeded scene (2,000 Gaussians, SH degree 3, a sphere shell and three blobs, off the
origin and asymmetric, so that a flipped or mirrored axis cannot go unnoticed) is written as an
INRIA PLY by our writer, then converted by PlayCanvas's splat-transform (compressed PLY, SPZ v3 and
v4, PLY, SOG) and exported by gsplat's `export_splats` (PLY, `.splat`, compressed PLY); a gsplat
`simple_trainer` checkpoint holds the same parameters. The reverse direction: our own SPZ and
compressed PLY, and gsplat's `.splat`, decoded by splat-transform back to PLY, so the tests check
that splat-transform reads what we write without node at test time.

splat-transform is installed with npm into a scratch folder outside the repository (never a
dependency of the package). Running the script again writes the same files, but for bytes that
carry no Gaussians: the gzip time stamp of our SPZ, and splat-transform's SOG (its k-means of the SH
is not seeded).

    .venv/bin/python tools/make_format_fixtures.py [--splat-transform-dir DIR] [--out tests/data/formats]
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SPLAT_TRANSFORM = "@playcanvas/splat-transform@2.7.1"  # the version the committed fixtures were written with
MAX_BYTES = 1 << 20  # each fixture is committed: keep it under 1 MB


def build_source_scene(n: int = 2000, seed: int = 0):
    """The fixtures' source: a coloured sphere shell (3/5 of the Gaussians) and three blobs.

    Centred away from the origin at z ~ 2.5 (RDF: in front of a camera at the origin), with log
    scales in [-4, -2], opacity logits in [-5, 5], unit quaternions, RGB in [0.05, 0.95] and
    higher SH coefficients up to 0.3 (degree 1), 0.2 (degree 2), 0.15 (degree 3): inside every
    format's range, so the tests measure quantisation, not clamping.
    """
    from gendistill.core.render.sh import rgb_to_sh
    from gendistill.core.scene import GaussianScene

    rng = np.random.default_rng(seed)
    n_shell = n * 3 // 5
    d = rng.normal(size=(n_shell, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    shell = np.array([0.4, -0.3, 2.5]) + 0.8 * d * (1 + 0.02 * rng.normal(size=(n_shell, 1)))
    parts, colours = [shell], [0.5 + 0.42 * d]  # colour from the direction: a smooth gradient
    blobs = [((1.7, 0.3, 3.2), (0.25, 0.10, 0.15), (0.9, 0.2, 0.1)),   # (centre, spread, rgb)
             ((-0.9, 1.0, 2.0), (0.08, 0.30, 0.08), (0.1, 0.85, 0.2)),
             ((0.3, -1.5, 1.4), (0.15, 0.05, 0.20), (0.15, 0.2, 0.9))]
    sizes = np.diff(np.linspace(0, n - n_shell, len(blobs) + 1).astype(int))
    for (centre, spread, rgb), k in zip(blobs, sizes):
        parts.append(np.array(centre) + rng.normal(size=(k, 3)) * np.array(spread))
        colours.append(np.clip(np.array(rgb) + 0.05 * rng.normal(size=(k, 3)), 0.05, 0.95))
    means = np.concatenate(parts)
    rgb = np.clip(np.concatenate(colours), 0.05, 0.95)
    quats = rng.normal(size=(n, 4))
    quats /= np.linalg.norm(quats, axis=1, keepdims=True)
    sh = np.zeros((n, 16, 3))
    sh[:, 0] = rgb_to_sh(torch.from_numpy(rgb)).numpy()
    for lo, hi, amp in ((1, 4, 0.3), (4, 9, 0.2), (9, 16, 0.15)):
        sh[:, lo:hi] = rng.uniform(-amp, amp, size=(n, hi - lo, 3))
    f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    return GaussianScene(means=f32(means), quats=f32(quats), log_scales=f32(rng.uniform(-4, -2, (n, 3))),
                         opacity_logits=f32(rng.uniform(-5, 5, n)), sh=f32(sh),
                         comments=[f"written by tools/make_format_fixtures.py (seed {seed})"])


def splat_transform_bin(folder: Path) -> Path:
    """The splat-transform CLI in `folder`, installed there with npm if it is not yet."""
    exe = folder / "node_modules" / ".bin" / "splat-transform"
    if not exe.exists():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--prefix", str(folder), "--no-save", SPLAT_TRANSFORM], check=True)
    return exe


def run_splat_transform(exe: Path, src: Path, dst: Path, *options: str) -> None:
    dst.unlink(missing_ok=True)  # a failed run leaves an empty file behind
    subprocess.run([str(exe), "-w", "-q", *options, str(src), str(dst)], check=True)


def export_gsplat(scene, out: Path) -> dict[str, str]:
    """gsplat's `export_splats` in its three formats, and a `simple_trainer` checkpoint."""
    from gsplat import export_splats

    s = scene.detach().to("cpu", torch.float32)
    args = (s.means, s.log_scales, s.quats, s.opacity_logits, s.sh[:, :1], s.sh[:, 1:])
    for name, fmt in (("gsplat.ply", "ply"), ("gsplat.splat", "splat"), ("gsplat.compressed.ply", "ply_compressed")):
        export_splats(*args, format=fmt, save_to=str(out / name))
    splats = {"means": s.means, "quats": s.quats, "scales": s.log_scales, "opacities": s.opacity_logits,
              "sh0": s.sh[:, :1].contiguous(), "shN": s.sh[:, 1:].contiguous()}
    torch.save({"step": 99, "splats": splats}, out / "ckpt_99_rank0.pt")
    return {"gsplat.ply": "export_splats(format='ply')",
            "gsplat.splat": "export_splats(format='splat'); our `.splat` writer writes the same bytes",
            "gsplat.compressed.ply": "export_splats(format='ply_compressed')",
            "ckpt_99_rank0.pt": "torch.save({'step': 99, 'splats': {...}}) as simple_trainer does"}


def versions(exe: Path) -> dict[str, str]:
    import gsplat
    import gsply

    res = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    st = (res.stdout + res.stderr).split()
    node = subprocess.run(["node", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    return {"splat-transform": f"splat-transform {st[1] if len(st) > 1 else '?'} (npm {SPLAT_TRANSFORM}, node {node})",
            "gsplat": f"gsplat {gsplat.__version__} (torch {torch.__version__})",
            "ours": f"gendistill (gsply {gsply.__version__})"}


def write_readme(out: Path, rows: list[tuple[str, str, str]]) -> None:
    table = "\n".join(f"| `{name}` | {writer} | {(out / name).stat().st_size:,} | {what} |"
                      for name, writer, what in rows)
    (out / "README.md").write_text(f"""# Scene files written by other tools

Fixtures of `tests/test_formats.py`, written once by `tools/make_format_fixtures.py` and committed so
that the tests need neither node nor splat-transform. Rebuild (installs splat-transform with npm into
a scratch folder outside the repository, never as a dependency):

    .venv/bin/python tools/make_format_fixtures.py --splat-transform-dir /tmp/splat-transform

The source is one seeded scene: 2,000 Gaussians, SH degree 3, a sphere shell centred at
(0.4, -0.3, 2.5) and three blobs, in the INRIA PLY's axes (RDF: x right, y down, z forward). Every
other file holds the same Gaussians as another tool wrote them; `*.st.ply` are files decoded by
splat-transform back to a PLY (the reverse direction: does splat-transform read what we write?).
The tests compare every file with the source, Gaussian by Gaussian (matched by position: writers
reorder), within tolerances derived from each format's bit depths, axes first: SPZ stores RUB axes
(y up, z back), so its reader and writer turn them (splat-transform does the same).

| file | written by | bytes | what |
| --- | --- | --- | --- |
{table}
""")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--splat-transform-dir", type=Path, default=Path("/tmp/splat-transform"))
    p.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "formats")
    args = p.parse_args(argv)
    from gendistill.core.formats import write_scene

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    exe = splat_transform_bin(args.splat_transform_dir)
    v = versions(exe)
    scene = build_source_scene()
    src = out / "source_sh3.ply"
    write_scene(scene, src)
    rows = [(src.name, v["ours"], "the source: our INRIA PLY writer")]

    st = [("st.ply", (), "its uncompressed PLY"), ("st.compressed.ply", (), "compressed PLY"),
          ("st.spz", (), "SPZ v4 (NGSP header, zstd; its default)"),
          ("st.v3.spz", ("--spz-version", "3"), "SPZ v3 (gzip)"),
          ("st.sog", ("-g", "cpu"), "SOG (a zip of WebP images; SH by k-means, on the CPU); not read here")]
    for name, options, what in st:
        run_splat_transform(exe, src, out / name, *options)
        rows.append((name, v["splat-transform"], f"`source_sh3.ply` converted: {what}"))

    for name, what in export_gsplat(scene, out).items():
        rows.append((name, v["gsplat"], what))
    write_scene(scene, out / "ours.splat")  # our .splat writer is export_splats: the same bytes
    if (out / "ours.splat").read_bytes() != (out / "gsplat.splat").read_bytes():
        raise SystemExit("ours.splat differs from gsplat.splat: write_splat no longer is export_splats")
    (out / "ours.splat").unlink()

    for name in ("ours.spz", "ours.compressed.ply"):
        write_scene(scene, out / name)
        rows.append((name, v["ours"], "our writer (`write_scene`)"))
    decoded = {"ours.spz": "ours_spz.st.ply", "ours.compressed.ply": "ours_compressed.st.ply",
               "gsplat.splat": "gsplat_splat.st.ply"}
    for name, dec in decoded.items():
        run_splat_transform(exe, out / name, out / dec)
        rows.append((dec, v["splat-transform"], f"`{name}` decoded by splat-transform to PLY"))

    big = [name for name, _, _ in rows if (out / name).stat().st_size >= MAX_BYTES]
    if big:
        raise SystemExit(f"fixtures over {MAX_BYTES} bytes: {big}")
    write_readme(out, rows)
    for name, writer, _ in rows:
        print(f"{name:28s} {(out / name).stat().st_size:>9,d}  {writer}")


if __name__ == "__main__":
    main()
