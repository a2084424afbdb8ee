"""Benchmark `gendistill.core.render.rasterize` backends: first call, forward, forward+backward, memory.

    python tools/bench_render.py                       # cpu and torch backends (+ gsplat with CUDA)
    python tools/bench_render.py --backends cpu --repeats 7 --skip-slow

Every (scene, backend) case runs in a fresh subprocess, so "first call" includes the one-time costs
(numba cache load or JIT compile, CUDA context) and the peak-memory column is that process's own:
peak resident set size from `resource.getrusage(RUSAGE_SELF).ru_maxrss` on CPU (the whole process:
Python, torch, the scene, everything), `torch.cuda.max_memory_allocated` on CUDA. "+render" is the
peak minus the resident size just before the first render call (what rendering itself added).

Timings: "forward" renders with inputs that do not require grad; "fwd+bwd" is one training step
(inputs require grad, loss = sum of render and alphas, backward). Both are the best of --repeats
runs: on a shared machine the best run is the least disturbed one; OMP_WAIT_POLICY defaults to
PASSIVE in the worker processes (set it to override). The full pipeline is timed
(projection, SH colours, compositing), through `rasterize(..., backend=...)`.

Scenes: garden (Mip-NeRF 360, 138,766 points from `../shared/data/test_garden.npz`, initialised as
3DGS does: scales from the 3 nearest neighbours, identity rotations, opacity 0.1, SH degree 3 with
the points' colours as DC) at 648x420 and at 162x105 (intrinsics scaled by 1/4), camera 0; and
20,000 random Gaussians with RGB features at 256x256.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GARDEN = ROOT.parent / "shared" / "data" / "test_garden.npz"
CASES = ("garden-648x420", "garden-162x105", "random20k-256x256")
SLOW = {("garden-648x420", "torch")}  # the slowest row: seconds per step, most of the run time


def make_case(name: str, device: str):
    """Render arguments (dict for `rasterize`) for a named case, float32 on `device`."""
    import numpy as np
    import torch

    if name.startswith("garden"):
        from gendistill.core.scene import GaussianScene

        data = np.load(GARDEN)
        scene = GaussianScene.from_points(data["means3d"], data["colors"], sh_degree=3)
        args = scene.render_args()
        Ks = torch.from_numpy(data["Ks"][:1]).float()
        width, height = int(data["width"]), int(data["height"])
        if name == "garden-162x105":
            Ks = Ks.clone()
            Ks[:, :2] /= 4
            width, height = width // 4, height // 4
        args.update(viewmats=torch.from_numpy(data["viewmats"][:1]).float(), Ks=Ks, width=width, height=height)
    elif name == "random20k-256x256":
        g = torch.Generator().manual_seed(0)
        n = 20_000
        means = torch.rand(n, 3, generator=g) * 2 - 1
        means[:, 2] += 3.0
        args = dict(
            means=means,
            quats=torch.randn(n, 4, generator=g),
            scales=torch.exp(torch.empty(n, 3).uniform_(-5.0, -2.5, generator=g)),
            opacities=torch.rand(n, generator=g),
            colors=torch.rand(n, 3, generator=g),
            viewmats=torch.eye(4)[None],
            Ks=torch.tensor([[[256.0, 0.0, 128.0], [0.0, 256.0, 128.0], [0.0, 0.0, 1.0]]]),
            width=256,
            height=256,
        )
    else:
        raise ValueError(f"unknown case {name!r}; known: {', '.join(CASES)}")
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in args.items()}


def _rss_gib() -> float:
    """Current resident set size of this process, GiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def run_worker(case: str, backend: str, repeats: int, skip_backward: bool, threads: int | None,
               torch_device: str = "cpu") -> dict:
    """Time one case in this process; returns the row as a dict."""
    import torch

    if threads:
        import numba

        torch.set_num_threads(threads)
        numba.set_num_threads(threads)

    from gendistill.core.render import rasterize

    device = {"gsplat": "cuda", "cpu": "cpu"}.get(backend, torch_device)  # the torch backend runs anywhere
    args = make_case(case, device)
    cuda = device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    keys = ("means", "quats", "scales", "opacities", "colors")

    def step(grad: bool) -> tuple[float, float]:
        inputs = dict(args)
        if grad:
            for k in keys:
                inputs[k] = args[k].detach().clone().requires_grad_(True)
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.set_grad_enabled(grad):
            render, alphas, _ = rasterize(**inputs, backend=backend)
            if grad:
                (render.sum() + alphas.sum()).backward()
        sync()
        return time.perf_counter() - t0, time.process_time() - c0

    rss_before = _rss_gib()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    first = step(False)[0]
    fwd, both = [], []
    for _ in range(repeats):  # interleaved, so a busy spell on a shared machine hits both columns
        fwd.append(step(False))
        if not skip_backward:
            both.append(step(True))
    forward, fwd_cpu = min(t for t, _ in fwd), min(c for _, c in fwd)
    both, both_cpu = (min(t for t, _ in both), min(c for _, c in both)) if both else (None, None)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
        added = peak
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        added = peak - rss_before
    return {"case": case, "backend": backend, "first": first, "forward": forward, "both": both,
            "forward_cpu": fwd_cpu, "both_cpu": both_cpu,
            "peak_gib": peak, "added_gib": added, "threads": torch.get_num_threads(), "device": device}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default=None,
                   help="comma-separated backends (default: cpu,torch, plus gsplat when CUDA is available)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per column; the best is reported")
    p.add_argument("--skip-slow", action="store_true", help="skip torch forward+backward on full-size garden")
    p.add_argument("--threads", type=int, default=None,
                   help="torch and numba threads (default: their own defaults, all cores)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    p.add_argument("--torch-device", default=None,
                   help="device of the torch backend (default: cuda when available, else cpu)")
    p.add_argument("--worker", nargs=2, metavar=("CASE", "BACKEND"), help=argparse.SUPPRESS)
    p.add_argument("--no-backward", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        print("RESULT " + json.dumps(run_worker(a.worker[0], a.worker[1], a.repeats, a.no_backward, a.threads,
                                                a.torch_device or "cpu")), flush=True)
        return

    if a.backends is None:
        import torch

        backends = ["cpu", "torch"] + (["gsplat"] if torch.cuda.is_available() else [])
    else:
        backends = [b for b in a.backends.split(",") if b]
    cases = [c for c in a.cases.split(",") if c]
    import torch

    torch_device = a.torch_device or ("cuda" if torch.cuda.is_available() else "cpu")
    if any(c.startswith("garden") for c in cases) and not GARDEN.is_file():
        sys.exit(f"garden data not found at {GARDEN}")

    # OpenMP threads that spin between parallel regions (torch's and numba's) starve each other and
    # everything else on a shared machine; passive waiting is the steadier default for a benchmark.
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONPATH": str(ROOT)}
    rows = []
    head = (f"{'scene':<20} {'backend':<8} {'first s':>8} {'forward s':>10} {'fwd+bwd s':>10} {'peak GiB':>9} "
            f"{'+render':>8} {'cpu-s fwd':>10} {'cpu-s f+b':>10}")
    print(head)
    print("-" * len(head))
    for case in cases:
        for backend in backends:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", case, backend, "--repeats",
                   str(a.repeats), "--torch-device", torch_device] + (["--threads", str(a.threads)] if a.threads else [])
            if a.skip_slow and (case, backend) in SLOW:
                cmd.append("--no-backward")
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"{case:<20} {backend:<8} failed: {err}")
                continue
            r = json.loads(lines[-1][len("RESULT "):])
            rows.append(r)
            both = "skipped" if r["both"] is None else f"{r['both']:.3f}"
            both_cpu = "skipped" if r["both_cpu"] is None else f"{r['both_cpu']:.3f}"
            print(f"{case:<20} {backend:<8} {r['first']:>8.2f} {r['forward']:>10.3f} {both:>10} "
                  f"{r['peak_gib']:>9.2f} {r['added_gib']:>8.2f} {r['forward_cpu']:>10.3f} {both_cpu:>10}", flush=True)
    if rows:
        dev = {r["device"] for r in rows}
        print(f"\nbest of {a.repeats} runs; torch threads {rows[0]['threads']}; device {', '.join(sorted(dev))}; "
              "peak = max RSS of a fresh process (CPU) or max CUDA memory allocated (CUDA rows); "
              "cpu-s = least process CPU time (all threads) of a run, a steadier figure on a shared machine; "
              f"OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rows, indent=1))
        print(f"rows written to {a.json}")


if __name__ == "__main__":
    main()
