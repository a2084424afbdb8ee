"""Scene file load / save speed and peak memory, per format, for large scenes.

Each measurement runs in a fresh process, after a warm-up that compiles the readers' kernels; its
peak memory is the rise of the peak RSS (VmHWM, reset before the step) over the RSS before it,
divided by the in-memory size of the scene's arrays (N x 59 float32 for SH degree 3). Targets
(issue 18): peak under 2.5x, INRIA PLY load at >= 1M Gaussians/s on 2 cores.

    .venv/bin/python tools/bench_io.py [--sizes 1000000 5000000] [--formats ply compressed-ply spz splat]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUFFIX = {"ply": ".ply", "compressed-ply": ".compressed.ply", "spz": ".spz", "splat": ".splat"}


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def _reset_peak() -> None:
    """Start the peak RSS (VmHWM) afresh (Linux): one-time costs before it do not count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def scene(n: int, seed: int = 0):
    import torch

    from gendistill.core.scene import GaussianScene

    g = torch.Generator().manual_seed(seed)
    return GaussianScene(means=torch.randn(n, 3, generator=g) * 3, quats=torch.randn(n, 4, generator=g),
                         log_scales=torch.randn(n, 3, generator=g) * 0.5 - 4, opacity_logits=torch.randn(n, generator=g),
                         sh=torch.randn(n, 16, 3, generator=g) * 0.2)


def child(op: str, fmt: str, n: int, path: str) -> None:
    """One measurement in this process: prints a JSON line."""
    from gendistill.core.formats import read_scene, write_scene

    warm = Path(path).with_name("warm-up" + SUFFIX[fmt])  # compiles the readers' numba kernels first
    write_scene(scene(1000), warm, fmt)
    read_scene(warm, fmt)
    s = scene(n) if op == "save" else None
    base = _status_mib("VmRSS")
    _reset_peak()
    t = time.perf_counter()
    if op == "save":
        write_scene(s, path, fmt)
    else:
        s = read_scene(path, fmt)[0]
    seconds = time.perf_counter() - t
    print(json.dumps({"seconds": seconds, "peak_mib": _status_mib("VmHWM") - base, "n": len(s)}))


def run(op: str, fmt: str, n: int, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", op, fmt, str(n), str(path)],
                         capture_output=True, text=True)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000])
    p.add_argument("--formats", nargs="+", default=list(SUFFIX), choices=list(SUFFIX))
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        op, fmt, n, path = args.child
        return child(op, fmt, int(n), path)
    print("| format | Gaussians | file MiB | save s | save peak / arrays | load s | load M Gaussians/s | load peak / arrays |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            arrays_mib = n * 59 * 4 / 2**20
            for fmt in args.formats:
                path = Path(tmp) / f"scene{SUFFIX[fmt]}"
                save = run("save", fmt, n, path)
                load = run("load", fmt, n, path) if "error" not in save else save
                if "error" in load:
                    print(f"| {fmt} | {n:,} | - | {load['error']} |")
                    continue
                print(f"| {fmt} | {n:,} | {path.stat().st_size / 2**20:.0f} | {save['seconds']:.2f} | "
                      f"{save['peak_mib'] / arrays_mib:.2f}x | {load['seconds']:.2f} | {n / load['seconds'] / 1e6:.2f} | "
                      f"{load['peak_mib'] / arrays_mib:.2f}x |", flush=True)
                path.unlink()


if __name__ == "__main__":
    main()
