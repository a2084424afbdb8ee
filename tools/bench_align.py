"""Benchmark trd_loss: unchunked (full relation matrices) vs chunked, forward + backward.

Each case runs in a fresh subprocess. Peak memory is the growth of the process's peak
resident set (VmHWM, reset through /proc/self/clear_refs) over its resident set once the
inputs exist; on CUDA it is torch.cuda.max_memory_allocated over the same baseline. Time is
the best of `--repeats` runs (the first run is also the memory run).

    .venv/bin/python tools/bench_align.py                      # the default table, CPU
    .venv/bin/python tools/bench_align.py --cases 24x150 --chunks auto 256 512
    .venv/bin/python tools/bench_align.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["24x150", "13x1350"], help="TxN token grids (B=1)")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--chunks", nargs="+", default=["auto"], help="chunk sizes for the chunked path, or 'auto'")
    p.add_argument("--reduction", default="joint", choices=["joint", "paper"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-unchunked", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return

    rows = []
    for case in args.cases:
        T, N = (int(v) for v in case.split("x"))
        modes = ([] if args.skip_unchunked else ["unchunked"]) + [f"chunk={c}" for c in args.chunks]
        base = None
        for mode in modes:
            spec = dict(T=T, N=N, D=args.dim, mode=mode, reduction=args.reduction, repeats=args.repeats, device=args.device)
            r = _run_case(spec)
            if mode == "unchunked":
                base = r
            rows.append((case, T * N, mode, r, base))
            print(_format_row(*rows[-1]), flush=True)
    print()
    print(_table(rows, args))


def _run_case(spec: dict) -> dict:
    """One case in a fresh interpreter; returns the worker's JSON."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, env=env, check=False
    )
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _worker(spec: dict) -> dict:
    import gc

    import torch

    from gendistill.core.align import trd_loss, trd_loss_reference

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    shape = (1, spec["T"], spec["N"], spec["D"])
    student = torch.randn(shape, device=device).requires_grad_()
    teacher = torch.randn(shape, device=device)
    mode = spec["mode"]
    if mode == "unchunked":
        fn = lambda: trd_loss_reference(student, teacher, reduction=spec["reduction"])  # noqa: E731
    else:
        chunk = None if mode == "chunk=auto" else int(mode.split("=")[1])
        fn = lambda: trd_loss(student, teacher, reduction=spec["reduction"], chunk_size=chunk)  # noqa: E731

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    gc.collect()
    sync()
    base = _memory_now(device)
    _reset_peak(device)
    times, peak, value = [], None, None
    for i in range(spec["repeats"]):
        student.grad = None
        gc.collect()
        sync()
        t0 = time.perf_counter()
        loss = fn()
        loss.backward()
        sync()
        times.append(time.perf_counter() - t0)
        value = float(loss)
        del loss
        if i == 0:
            peak = _memory_peak(device) - base
    return {"seconds": min(times), "all_seconds": times, "peak_mb": peak / 2**20, "loss": value}


def _memory_now(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_status("VmRSS")


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")


def _memory_peak(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status("VmHWM")


def _proc_status(key: str) -> int:
    """A /proc/self/status entry in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status (Linux only)")


def _format_row(case, tokens, mode, r, base) -> str:
    if "error" in r:
        return f"{case:>9} {tokens:>7} {mode:>12}  error: {r['error']}"
    rel = ""
    if base is not None and "error" not in base and mode != "unchunked":
        rel = f"{r['seconds'] / base['seconds']:>7.2f}x {100 * r['peak_mb'] / base['peak_mb']:>7.1f}%"
    runs = ",".join(f"{t:.2f}" for t in r["all_seconds"])
    return f"{case:>9} {tokens:>7} {mode:>12} {r['seconds']:>9.3f} {r['peak_mb']:>10.1f} {rel:>17}  loss={r['loss']:.6f} runs=[{runs}]"


def _table(rows, args) -> str:
    head = (
        f"trd_loss forward+backward, B=1, D={args.dim}, reduction={args.reduction}, device={args.device}, "
        f"best of {args.repeats}\n"
        f"{'TxN':>9} {'tokens':>7} {'mode':>12} {'seconds':>9} {'peak MB':>10} {'time, mem vs unchunked':>17}"
    )
    return "\n".join([head] + [_format_row(*r) for r in rows])


if __name__ == "__main__":
    main()
