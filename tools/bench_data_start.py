"""Time the data part of starting a finetuning run over a large manifest, first run and later runs.

The trainer's start-up over N manifest rows: find the clips (`discover_clips`), fingerprint them
(`file_digests` with its index, then `clip_fingerprint`) and look each key up in the feature cache.
The files are fake and tiny (their content is hashed, never decoded); every cache entry exists, as
after a first run has filled it, so no clip is encoded. Target (issue 17): under 30 s for 100k rows
after the first run.

    .venv/bin/python tools/bench_data_start.py [--rows 100000] [--work /tmp/bench_data_start]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from gendistill.video_distill.data import FeatureCache, clip_fingerprint, discover_clips, file_digests

SETTINGS = {"model": "THUDM/CogVideoX-2b#0123456789abcdef", "num_frames": 49, "height": 480, "width": 720,
            "sampling": "uniform", "text_length": 226, "dtype": "torch.bfloat16",
            "teacher": {"name": "videomaev2", "num_frames": 16, "image_size": [160, 240]}}


def make_dataset(work: Path, rows: int) -> Path:
    """`rows` distinct 4 KiB files in folders of 1000 and a CSV manifest of them."""
    manifest = work / "manifest.csv"
    if manifest.is_file() and sum(1 for _ in open(manifest)) == rows + 1:
        return manifest
    lines = ["video,caption"]
    for i in range(rows):
        rel = f"clips/{i // 1000:04d}/{i:07d}.mp4"
        path = work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(i.to_bytes(8, "little") * 512)
        lines.append(f"{rel},a clip numbered {i}")
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def start(manifest: Path, cache: FeatureCache) -> tuple[dict, list[str]]:
    """The start-up steps, each timed; returns ({step: seconds}, keys)."""
    t, times = time.perf_counter(), {}
    clips, _ = discover_clips(manifest)
    times["discover"], t = time.perf_counter() - t, time.perf_counter()
    digests = file_digests([c.video for c in clips], cache.folder / "file_digests.json")
    times["digests"], t = time.perf_counter() - t, time.perf_counter()
    keys = [clip_fingerprint(c, SETTINGS, d) for c, d in zip(clips, digests)]
    times["fingerprints"], t = time.perf_counter() - t, time.perf_counter()
    missing = sum(k not in cache for k in keys)
    times["cache lookup"] = time.perf_counter() - t
    times["total"] = sum(times.values())
    return times, keys if missing else []


def fill(cache: FeatureCache, keys: list[str]) -> None:
    """Every key gets an entry: copies of one small real safetensors file (as after a first run)."""
    import torch

    cache.save(keys[0], {"x": torch.zeros(1)})
    entry = cache.path(keys[0]).read_bytes()
    for k in keys[1:]:
        p = cache.path(k)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(entry)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_data_start"))
    args = p.parse_args(argv)
    manifest = make_dataset(args.work, args.rows)
    cache = FeatureCache(args.work / "cache")
    shutil.rmtree(cache.folder, ignore_errors=True)
    first, keys = start(manifest, cache)  # no digest index yet: every file is read
    fill(cache, keys)
    later, _ = start(manifest, cache)
    print(f"{args.rows} manifest rows of 4 KiB files; seconds")
    print(f"| step | first run | later runs |\n|---|---|---|")
    for step in first:
        print(f"| {step} | {first[step]:.2f} | {later[step]:.2f} |")


if __name__ == "__main__":
    main()
