"""Memory and time of the "cpu" backend's backward pass (`rasterize_to_pixels_cpu`) for growing sizes.

    python tools/bench_cpu_memory.py                    # the default table
    python tools/bench_cpu_memory.py --cases 100000x4x2 400000x4x8 --size 256 --repeats 3

Each case is N Gaussians x C cameras x T numba threads, run in a fresh subprocess (so that
NUMBA_NUM_THREADS can be T even above the core count: the memory figures hold, the timings of an
oversubscribed case do not). The inputs are random 2D Gaussians in float32, as a training step
passes them: centres in the image, scales 0.5 to 3 px, opacities 0.05 to 0.95, RGB colours.

Columns:
- "bwd peak MiB": the tracemalloc peak during `loss.backward()` over what was allocated before it,
  from the second pass on (the first may compile or load kernels). It sees every numpy array and
  every array numba's kernels allocate (numba's allocator reports to tracemalloc), not torch's
  own tensors (the output gradient in the inputs' dtype, float32 here).
- "grads MiB": of that, the float64 [C * N, 6 + D] gradient array the backward fills and returns
  (needed whatever the scheme); the rest of the peak is scratch.
- "scratch cap MiB": the most gradient scratch the backend allocates for a run of tiles
  (`cpu_backend.backward_scratch_bytes`), when it has that helper; else "-" (then the scratch is
  one float64 [C * N, 6 + D] buffer per thread).
- "bwd s": the best of --repeats backward passes (forward excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CASES = ("100000x1x1", "100000x1x2", "100000x4x2", "100000x4x8", "400000x4x2", "400000x4x8")


def make_inputs(n_gauss: int, n_cams: int, size: int, seed: int = 0):
    """Random float32 inputs for `rasterize_to_pixels_cpu` (means2d, conics, colors, opacities, depths,
    radii, backgrounds) with means2d, colors and opacities requiring grad."""
    import torch

    g = torch.Generator().manual_seed(seed)
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    means2d = u(n_cams, n_gauss, 2) * size
    s = 0.5 + 2.5 * u(n_cams, n_gauss, 2)
    th = u(n_cams, n_gauss) * torch.pi
    cos, sin = torch.cos(th), torch.sin(th)
    ia, ib = 1 / s[..., 0] ** 2, 1 / s[..., 1] ** 2
    conics = torch.stack([cos * cos * ia + sin * sin * ib, cos * sin * (ia - ib), sin * sin * ia + cos * cos * ib], -1)
    colors = u(n_cams, n_gauss, 3)
    opacities = 0.05 + 0.9 * u(n_cams, n_gauss)
    depths = u(n_cams, n_gauss)
    radii = torch.ceil(3 * s.max(-1, keepdim=True).values).expand(-1, -1, 2).to(torch.int32).contiguous()
    bg = u(n_cams, 3)
    leaves = [t.requires_grad_(True) for t in (means2d, colors, opacities)]
    return leaves[0], conics, leaves[1], leaves[2], depths, radii, bg


def run_case(n_gauss: int, n_cams: int, size: int, repeats: int) -> dict:
    """Runs in the worker process: forward, then timed and traced backward passes."""
    import time
    import tracemalloc

    import numba
    import torch

    from gendistill.core.render import cpu_backend

    torch.set_num_threads(1)
    means2d, conics, colors, opacities, depths, radii, bg = make_inputs(n_gauss, n_cams, size)
    best, peak = float("inf"), 0
    for rep in range(repeats + 1):
        for t in (means2d, colors, opacities):
            t.grad = None
        render, alphas = cpu_backend.rasterize_to_pixels_cpu(means2d, conics, colors, opacities, depths, radii,
                                                             size, size, bg)
        loss = render.sum() + alphas.sum()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        start = time.perf_counter()
        loss.backward()
        elapsed = time.perf_counter() - start
        if rep:  # the first pass may also compile or load kernels, which tracemalloc would count
            peak = max(peak, tracemalloc.get_traced_memory()[1] - base)
            best = min(best, elapsed)
        tracemalloc.stop()
    scratch = None
    if hasattr(cpu_backend, "backward_scratch_bytes"):
        scratch = cpu_backend.backward_scratch_bytes(3)
    return {"gaussians": n_gauss, "cameras": n_cams, "threads": numba.get_num_threads(), "size": size,
            "bwd_peak_mib": peak / 2**20, "grads_mib": n_cams * n_gauss * 9 * 8 / 2**20,
            "scratch_mib": None if scratch is None else scratch / 2**20,
            "bwd_s": best}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="NxCxT: Gaussians x cameras x threads")
    parser.add_argument("--size", type=int, default=256, help="image width = height in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        n, c = (int(v) for v in args.worker.split("x")[:2])
        print(json.dumps(run_case(n, c, args.size, args.repeats)))
        return 0
    rows = []
    print(f"{'Gaussians':>10} {'cameras':>7} {'threads':>7} {'bwd peak MiB':>12} {'grads MiB':>9} "
          f"{'scratch cap MiB':>15} {'bwd s':>7}")
    for case in args.cases:
        threads = case.split("x")[2]
        env = {**os.environ, "NUMBA_NUM_THREADS": threads, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY",
                                                                                             "PASSIVE")}
        proc = subprocess.run([sys.executable, __file__, "--worker", case, "--size", str(args.size), "--repeats",
                               str(args.repeats)], env=env, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            print(f"{case}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        scratch = "-" if row["scratch_mib"] is None else f"{row['scratch_mib']:.1f}"
        print(f"{row['gaussians']:>10} {row['cameras']:>7} {row['threads']:>7} {row['bwd_peak_mib']:>12.1f} "
              f"{row['grads_mib']:>9.1f} {scratch:>15} {row['bwd_s']:>7.3f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
