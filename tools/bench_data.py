"""Clips/s and peak RSS of streaming decoding (PyAV, only the sampled frames) against whole-clip decoding.

    .venv/bin/python tools/bench_data.py [--minutes 10] [--short-clips 1000] [--work /tmp/bench_data]

Data, made with ffmpeg (imageio_ffmpeg's binary) under --work and reused by later runs: a 1080p 30 fps
clip of --minutes minutes (testsrc2, libx264 ultrafast, a keyframe every 60 frames; one minute is
encoded and looped with -c copy, which is quicker than encoding the whole length), its first 10 s and
first minute, and --short-clips 3 s 720x480 clips (10 encoded, the rest hard links to them; --short-samples
of them timed).

Each row is one fresh process (so its peak RSS is its own, plus its largest child: imageio's ffmpeg)
loading 49-frame samples resized to 480x720 as the trainer does:
  stream       `load_clip` (PyAV: seek, decode forward only to the sampled frames);
  whole        the old `load_clip`: `read_video` (imageio, the whole clip in memory), then sample; only
               run while the decoded clip fits in --max-whole-gb;
  whole-iter   imageio's ffmpeg reader over the whole clip, keeping only the sampled frames: the old
               path's decoding time without its memory, for clips too long for `whole`.
Sampling: "uniform" (49 frames spread over the clip) and "fps" (8 fps from frame 0). Targets (issue 20):
stream's RSS flat in clip length; stream >= 3x the clips/s of whole-clip decoding on long clips.
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

FRAMES, HEIGHT, WIDTH, FPS = 49, 480, 720, 8.0


def ffmpeg(*args: str) -> None:
    import imageio_ffmpeg

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", *args], check=True)


def make_long(work: Path, minutes: float) -> dict[str, Path]:
    """The 1080p clip of `minutes` and its first 10 s and minute: {label: path}."""
    work.mkdir(parents=True, exist_ok=True)
    seconds = round(minutes * 60)
    unit = min(seconds, 60)
    one = work / f"unit_{unit}s.mp4"
    if not one.is_file():
        t = time.perf_counter()
        ffmpeg("-f", "lavfi", "-i", "testsrc2=size=1920x1080:rate=30", "-t", str(unit), "-c:v", "libx264",
               "-preset", "ultrafast", "-g", "60", "-pix_fmt", "yuv420p", str(one))
        print(f"encoded {one} ({unit} s of 1080p) in {time.perf_counter() - t:.0f} s", flush=True)
    out = {}
    for label, length in (("10 s", 10), ("1 min", 60), (f"{minutes:g} min", seconds)):
        if length > seconds or label in out:
            continue
        path = work / f"long_{length}s.mp4"
        if not path.is_file():
            loops = -(-length // unit) - 1
            ffmpeg("-stream_loop", str(loops), "-i", str(one), "-t", str(length), "-c", "copy", str(path))
        out[label] = path
    return out


def make_short(work: Path, n: int) -> list[Path]:
    """`n` 3 s 720x480 clips (10 distinct ones, hard-linked)."""
    folder = work / "short"
    folder.mkdir(parents=True, exist_ok=True)
    base = []
    for k in range(min(10, n)):
        path = folder / f"base_{k}.mp4"
        if not path.is_file():
            ffmpeg("-f", "lavfi", "-i", f"testsrc2=size=720x480:rate=30,hue=h={36 * k}", "-t", "3", "-c:v", "libx264",
                   "-preset", "veryfast", "-pix_fmt", "yuv420p", str(path))
        base.append(path)
    clips = []
    for i in range(n):
        path = folder / f"clip_{i:05d}.mp4"
        if not path.exists():
            os.link(base[i % len(base)], path)
        clips.append(path)
    return clips


# -- one measurement, in its own process -------------------------------------------------------------
def worker(method: str, sampling: str, files: list[str], samples: int) -> dict:
    import imageio.v2 as iio2
    import numpy as np

    import gendistill.video_distill.data as data
    from gendistill.core.media import read_video

    decoded = [0]
    spy = data._decoded_frames

    def counting(container, stream):
        for frame in spy(container, stream):
            decoded[0] += 1
            yield frame

    data._decoded_frames = counting
    fps = FPS if sampling == "fps" else None

    def decode(path: str) -> np.ndarray:
        """The sampled frames, uint8 [49, H, W, 3]."""
        if method == "stream":  # load_clip without its resize
            with data._open_video(path) as container:
                info, counted = data._stream_info(container, path)
                idx = data.sample_frame_indices(info.frames, FRAMES, sampling, fps=fps, source_fps=info.fps)
                return data._read_frames(container, idx, path, rewind=counted)
        info = data.probe_video(path)
        idx = data.sample_frame_indices(info.frames, FRAMES, sampling, fps=fps, source_fps=info.fps)
        if method == "whole":  # the old load_clip
            frames = read_video(path)
            decoded[0] += len(frames)
            return frames[idx]
        keep, wanted = {}, set(idx)
        with iio2.get_reader(path, format="FFMPEG") as reader:
            for k, frame in enumerate(reader):
                decoded[0] += 1
                if k in wanted:
                    keep[k] = frame
        return np.stack([keep[k] for k in idx])

    data._to_tensor(decode(files[0]), HEIGHT, WIDTH)  # warm-up (imports, first open), not timed
    decoded[0] = 0
    t_decode = t_total = 0.0
    for i in range(samples):
        t0 = time.perf_counter()
        frames = decode(str(files[i % len(files)]))
        t1 = time.perf_counter()
        out = data._to_tensor(frames, HEIGHT, WIDTH)  # load_clip's resize and crop, the same for every decoder
        t_decode, t_total = t_decode + t1 - t0, t_total + time.perf_counter() - t0
        assert out.shape == (FRAMES, 3, HEIGHT, WIDTH), out.shape
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"decode_s": samples / t_decode, "clips_s": samples / t_total, "decoded": decoded[0] / samples,
            "rss_mb": rss / 1024}


def measure(method: str, sampling: str, files: list[Path], samples: int) -> dict:
    listing = Path(files[0]).parent / f".files_{os.getpid()}.json"
    listing.write_text(json.dumps([str(f) for f in files]))
    try:
        r = subprocess.run([sys.executable, __file__, "--worker", method, "--sampling", sampling, "--files",
                            str(listing), "--samples", str(samples)], capture_output=True, text=True)
    finally:
        listing.unlink()
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:80]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the long 1080p clip")
    ap.add_argument("--short-clips", type=int, default=1000)
    ap.add_argument("--short-samples", type=int, default=None, help="clips timed per short-clip row (default: all)")
    ap.add_argument("--work", default="/tmp/bench_data")
    ap.add_argument("--max-whole-gb", type=float, default=4.0, help="run `whole` only below this decoded size")
    ap.add_argument("--long-samples", type=int, default=2, help="samples timed per long-clip row")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--sampling", default="uniform", help=argparse.SUPPRESS)
    ap.add_argument("--files", help=argparse.SUPPRESS)
    ap.add_argument("--samples", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.sampling, json.loads(Path(args.files).read_text()), args.samples)))
        return 0

    from gendistill.video_distill.data import probe_video

    work = Path(args.work)
    t0 = time.perf_counter()
    long = make_long(work, args.minutes)
    short = make_short(work, args.short_clips)
    print(f"data ready in {time.perf_counter() - t0:.0f} s under {work}/", flush=True)

    rows = []
    header = (f"{'clips':<24} {'sampling':<9} {'decoder':<11} {'decode clips/s':>14} {'+resize clips/s':>15} "
              f"{'frames decoded/clip':>19} {'peak RSS MB':>11}")
    print(header + "\n" + "-" * len(header), flush=True)

    def row(case: str, sampling: str, method: str, files: list[Path], samples: int) -> dict:
        r = measure(method, sampling, files, samples)
        figures = (f"  failed: {r['error']}" if "error" in r else
                   f"{r['decode_s']:>14.3f} {r['clips_s']:>15.3f} {r['decoded']:>19.0f} {r['rss_mb']:>11.0f}")
        print(f"{case:<24} {sampling:<9} {method:<11} {figures}", flush=True)
        rows.append({"case": case, "sampling": sampling, "method": method, **r})
        return r

    for label, path in long.items():
        info = probe_video(path)
        case = f"1080p {label} ({info.frames} fr)"
        for sampling in ("uniform", "fps"):
            row(case, sampling, "stream", [path], args.long_samples)
        if info.frames * info.height * info.width * 3 <= args.max_whole_gb * 1e9:
            row(case, "uniform", "whole", [path], 1)
        else:
            need = info.frames * info.height * info.width * 3 / 1e9
            print(f"{case:<24} {'uniform':<9} {'whole':<11}  not run: the decoded clip is {need:.0f} GB "
                  f"(> --max-whole-gb {args.max_whole_gb:g})", flush=True)
        row(case, "uniform", "whole-iter", [path], 1)
    case = f"{len(short)} x 720x480 3 s"
    for method in ("stream", "whole"):
        row(case, "uniform", method, short, args.short_samples or len(short))

    def find(case_prefix, sampling, method):
        return next((r for r in rows if r["case"].startswith(case_prefix) and r["sampling"] == sampling
                     and r["method"] == method and "error" not in r), None)

    longest = f"1080p {list(long)[-1]}"
    s, w = find(longest, "uniform", "stream"), find(longest, "uniform", "whole-iter")
    print()
    if s and w:
        print(f"longest clip, uniform: stream {s['decode_s'] / w['decode_s']:.1f}x the decode clips/s of whole-clip "
              f"decoding (target >= 3x), {s['clips_s'] / w['clips_s']:.1f}x with the resize")
    streams = [r["rss_mb"] for r in rows if r["case"].startswith("1080p") and r["method"] == "stream" and "rss_mb" in r]
    if streams:
        print(f"stream peak RSS over the 1080p lengths: {min(streams):.0f}..{max(streams):.0f} MB (target: flat)")
    ss, sw = find(f"{len(short)} x", "uniform", "stream"), find(f"{len(short)} x", "uniform", "whole")
    if ss and sw:
        print(f"short clips: stream {ss['decode_s'] / sw['decode_s']:.1f}x the decode clips/s of whole-clip decoding, "
              f"{ss['clips_s'] / sw['clips_s']:.1f}x with the resize")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
