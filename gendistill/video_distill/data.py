"""Training clips: discovery (folder or manifest), decoding, frame sampling, buckets, resumable batches, feature cache.

    clips, problems = discover_clips("assets/clips")        # videos with a .txt caption beside each
    ds = VideoClipDataset(clips, num_frames=49, height=480, width=720)
    item = ds[0]        # {"video": [49, 3, 480, 720] float in [0, 1], "caption": str, "index": int, "skipped": [...]}

Decoding streams (PyAV): only the sampled frames are turned into pixels; the decoder seeks to the keyframe
before the first one, decodes forward to the last one and seeks again across gaps longer than a keyframe
interval, so memory and time follow the sample (49 frames), not the clip (a 10-minute 1080p clip decoded
whole is 110 GB). Frame count and rate come from the stream header (counted from the packets when absent).
A variable-frame-rate stream (timestamps not those of one rate: told from mp4's sample index, else from the
packets' timestamps when the header's rates disagree) numbers its frames by position, and "fps" sampling
takes the frames nearest the target times (`VideoInfo.times`).

Buckets: with `bucket_clips` each clip goes to the bucket (frames, height, width) nearest its aspect ratio,
then its length; `BucketBatchSampler` draws each batch from one bucket and resumes at any batch.

Sources: a folder (every video with a `.txt` caption beside it, searched recursively), a CSV
manifest (columns `video` / `path` / `file` and `caption` / `prompt` / `text`), a JSON manifest (a
list of such objects, or `{"clips": [...]}`), JSON Lines, Parquet (the same columns, read with
pyarrow), or a Hugging Face `datasets` folder (`save_to_disk`; its video column holds paths or the
video bytes, read lazily: `DatasetVideo`). Relative paths are resolved against `root`, else the
manifest's folder. WebDataset shards (`shards/train-{000000..000009}.tar`, or a folder of .tar files)
are streamed, not listed: `WebDatasetClips` yields the same items, each process and DataLoader worker
reading its own shards, and resumes exactly where a checkpoint left it (`ShardStreamPosition`). Bytes
(dataset cells, tar members) decode with the same streaming decoder.

Bad input never stops a run: a manifest row pointing nowhere or a video without caption is left
out at discovery (returned in `problems`); a video that cannot be decoded or is shorter than
`num_frames` is skipped when read, with a warning, and the next clip is taken in its place (the
skipped paths are returned with the item so the trainer can count them).

`FeatureCache` stores, per clip, the VAE latent distribution, the prompt embedding and the teacher
tokens under a fingerprint of (file content, caption, models, resolution, frames, teacher), so a
cache entry made with other settings or an edited video is never read.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, IterableDataset, Sampler

from gendistill.core.io import atomic_path
from gendistill.core.media import read_video

__all__ = [
    "VIDEO_EXTENSIONS",
    "SAMPLING_MODES",
    "Clip",
    "DatasetVideo",
    "VideoInfo",
    "discover_clips",
    "is_shard_source",
    "expand_shards",
    "probe_video",
    "probe_videos",
    "sample_frame_indices",
    "frames_available",
    "decode_frames",
    "resize_crop",
    "load_clip",
    "assign_bucket",
    "bucket_clips",
    "VideoClipDataset",
    "ResumableBatchSampler",
    "BucketBatchSampler",
    "WebDatasetClips",
    "ShardStreamPosition",
    "collate_clips",
    "file_digest",
    "file_digests",
    "model_identity",
    "clip_fingerprint",
    "FeatureCache",
]

logger = logging.getLogger("gendistill.video_distill")

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".gif", ".m4v")
_VIDEO_COLUMNS = ("video", "path", "file", "video_path", "filename")
_CAPTION_COLUMNS = ("caption", "prompt", "text", "title")
SAMPLING_MODES = ("uniform", "first", "stride", "fps")
_RESIZE_CHUNK = 4  # frames converted to float and resized at a time (bounds the float copy of 1080p frames)
_VIDEO_MEMBERS = {e[1:] for e in VIDEO_EXTENSIONS}
_SHARD_MEMBERS = _VIDEO_MEMBERS | {"txt", "json"}  # the tar members a WebDataset sample uses
_HF_DATASETS: dict[tuple, object] = {}  # (Hugging Face datasets folder, mtime) -> its loaded dataset, per process


@dataclass(frozen=True)
class DatasetVideo:
    """A video held in row `row` (from 0) of column `column` of a Hugging Face datasets folder: its bytes,
    or a path (relative to the folder) for columns of `{"bytes", "path"}` (datasets' `Video`)."""

    folder: Path
    column: str
    row: int

    def __str__(self) -> str:
        return f"{self.folder}[{self.row}].{self.column}"

    def read_bytes(self) -> bytes:
        value = _hf_dataset(self.folder)[self.row][self.column]
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, str) and value:
            path = Path(value).expanduser()
            return (path if path.is_absolute() else self.folder / path).read_bytes()
        if not value:
            raise ValueError("no video in this cell")
        return bytes(value)


@dataclass(frozen=True)
class Clip:
    """One training clip: a video (file, or `DatasetVideo`) and its caption."""

    video: Path | DatasetVideo
    caption: str


@dataclass(frozen=True)
class VideoInfo:
    """A video stream's metadata: frame count, frame rate (None when unknown), frame size in pixels, and for
    a variable-frame-rate stream each frame's time in seconds from the first (presentation order; None at a
    constant rate, where frame i is at i / fps)."""

    frames: int
    fps: float | None
    height: int
    width: int
    times: tuple[float, ...] | None = field(default=None, repr=False)


# -- discovery ----------------------------------------------------------------------------------------
def _pick_column(keys: Sequence[str], wanted: Sequence[str], what: str, source: Path) -> str:
    lower = {k.lower().strip(): k for k in keys}
    for name in wanted:
        if name in lower:
            return lower[name]
    raise ValueError(f"{source}: no {what} column; expected one of {', '.join(wanted)}, found {', '.join(keys)}")


def _parquet_rows(path: Path) -> tuple[list[str], list[dict]]:
    """A Parquet manifest's column names and rows (only its video and caption columns are read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as err:  # not Parquet, truncated
        raise ValueError(f"{path}: cannot read the Parquet manifest: {err}") from err
    keys = list(schema.names)
    vcol = _pick_column(keys, _VIDEO_COLUMNS, "video", path)
    ccol = _pick_column(keys, _CAPTION_COLUMNS, "caption", path)
    vtype = schema.field(vcol).type
    if pa.types.is_binary(vtype) or pa.types.is_large_binary(vtype) or pa.types.is_fixed_size_binary(vtype):
        raise ValueError(f"{path}: column {vcol} holds video bytes; a manifest lists paths (keep bytes in a "
                         "Hugging Face datasets folder or WebDataset shards)")
    return keys, pq.read_table(path, columns=[vcol, ccol]).to_pylist()


def _manifest_rows(path: Path) -> tuple[list[str], list]:
    """A manifest's column names (those of its first object for JSON) and its rows."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    if suffix == ".parquet":
        return _parquet_rows(path)
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(rows, dict):
            rows = rows.get("clips", rows.get("data"))
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a JSON manifest must be a list of {{video, caption}} objects or {{\"clips\": [...]}}")
    else:
        raise ValueError(f"{path}: unknown manifest type {suffix!r}; use a folder, .csv, .json, .jsonl or .parquet")
    first = next((row for row in rows if isinstance(row, dict)), {})
    return list(first), rows


def _listed_clips(rows, vcol: str, ccol: str, base: Path) -> tuple[list[Clip], list[str]]:
    """Clips of manifest rows, given as (where, row) pairs: each row's video path (relative to `base`) and
    caption; a row left out is a problem line starting with its `where`."""
    clips, problems = [], []
    for where, row in rows:
        if not isinstance(row, dict):
            problems.append(f"{where}: not an object")
            continue
        video, caption = str(row.get(vcol) or "").strip(), str(row.get(ccol) or "").strip()
        path = Path(video).expanduser()
        path = path if path.is_absolute() else base / path
        if not video:
            problems.append(f"{where}: empty video path")
        elif not path.is_file():
            problems.append(f"{where}: video {path} does not exist")
        elif not caption:
            problems.append(f"{where}: empty caption for {path}")
        else:
            clips.append(Clip(path, caption))
    return clips, problems


def _hf_folder(source: Path) -> Path | None:
    """The dataset folder when `source` is `save_to_disk` output (of a DatasetDict: its "train" split, or
    its only one), else None."""
    if (source / "state.json").is_file() and (source / "dataset_info.json").is_file():
        return source
    splits_file = source / "dataset_dict.json"
    if not splits_file.is_file():
        return None
    splits = json.loads(splits_file.read_text()).get("splits", [])
    split = "train" if "train" in splits else splits[0] if len(splits) == 1 else None
    if split is None:
        raise ValueError(f"{source}: a dataset with splits {', '.join(splits)} and none named train: give the "
                         "split's folder")
    return source / split


def _hf_dataset(folder: Path):
    """The `datasets.Dataset` saved in `folder` (memory-mapped, loaded once per process); columns that
    decode (datasets' Video, Image) are read raw, as {"bytes", "path"}."""
    from dataclasses import replace

    path, state = os.path.abspath(folder), Path(folder) / "state.json"
    key = (path, state.stat().st_mtime_ns if state.is_file() else 0)  # a folder saved again is loaded again
    if key not in _HF_DATASETS:
        import datasets

        try:
            ds = datasets.load_from_disk(path)
        except Exception as err:  # missing arrow files, a version it cannot read
            raise ValueError(f"{folder}: cannot load the Hugging Face dataset: {err}") from err
        for name, feature in ds.features.items():
            if getattr(feature, "decode", None) is True:
                ds = ds.cast_column(name, replace(feature, decode=False))
        _HF_DATASETS[key] = ds
    return _HF_DATASETS[key]


def _hf_clips(folder: Path, root: str | os.PathLike | None) -> tuple[list[Clip], list[str]]:
    """Clips of a Hugging Face datasets folder: a column of paths as in a manifest (relative to `root`, else
    the folder), or of video bytes (`DatasetVideo` clips, read when the clip is). Rows are named folder[i]."""
    import pyarrow.compute as pc

    ds = _hf_dataset(folder)
    vcol = _pick_column(ds.column_names, _VIDEO_COLUMNS, "video", folder)
    ccol = _pick_column(ds.column_names, _CAPTION_COLUMNS, "caption", folder)
    feature, captions = ds.features[vcol], list(ds[ccol])
    dtype = getattr(feature, "dtype", None)
    if dtype in ("string", "large_string"):
        base = Path(root).expanduser() if root else folder
        rows = ((f"{folder}[{i}]", {vcol: v, ccol: c}) for i, (v, c) in enumerate(zip(ds[vcol], captions)))
        return _listed_clips(rows, vcol, ccol, base)
    if dtype in ("binary", "large_binary"):
        sizes = pc.binary_length(ds.data.column(vcol)).to_pylist()  # from the offsets: no bytes read
    elif hasattr(feature, "decode"):  # {"bytes", "path"} cells (datasets' Video): checked when read
        sizes = pc.is_valid(ds.data.column(vcol)).to_pylist()
    else:
        raise ValueError(f"{folder}: column {vcol} holds {feature}; expected video paths (string) or video "
                         "bytes (binary)")
    clips, problems = [], []
    for i, (size, caption) in enumerate(zip(sizes, captions)):
        caption = str(caption or "").strip()
        if not size:
            problems.append(f"{folder}[{i}]: no video in column {vcol}")
        elif not caption:
            problems.append(f"{folder}[{i}]: empty caption")
        else:
            clips.append(Clip(DatasetVideo(folder, vcol, i), caption))
    return clips, problems


def discover_clips(source: str | os.PathLike, root: str | os.PathLike | None = None) -> tuple[list[Clip], list[str]]:
    """Find the clips of a folder, manifest (.csv, .json, .jsonl, .parquet) or Hugging Face datasets folder.

    Returns (clips sorted by path for folders / in manifest order, problems), where each problem is
    one line naming a row or file that was left out and why. Raises FileNotFoundError when `source`
    does not exist and ValueError when it holds no usable clip, lacks a video or caption column (the
    error names the manifest and the columns), or is WebDataset shards (streamed: `WebDatasetClips`).
    """
    if is_shard_source(source):
        raise ValueError(f"{source} holds WebDataset shards, which are streamed rather than listed: read them "
                         "with WebDatasetClips")
    source = Path(source).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"training data {source} does not exist (give a folder of videos with .txt "
                                "captions, a .csv / .json / .jsonl / .parquet manifest, a Hugging Face datasets "
                                "folder or WebDataset shards)")
    clips, problems = [], []
    hf_folder = _hf_folder(source) if source.is_dir() else None
    if hf_folder is not None:
        clips, problems = _hf_clips(hf_folder, root)
    elif source.is_dir():
        for video in sorted(p for p in source.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()):
            caption_file = video.with_suffix(".txt")
            if not caption_file.is_file():
                problems.append(f"{video}: no caption file {caption_file.name} beside it")
                continue
            caption = caption_file.read_text(encoding="utf-8").strip()
            if not caption:
                problems.append(f"{video}: caption file {caption_file.name} is empty")
                continue
            clips.append(Clip(video, caption))
    else:
        keys, rows = _manifest_rows(source)
        if keys or rows:
            vcol = _pick_column(keys, _VIDEO_COLUMNS, "video", source)
            ccol = _pick_column(keys, _CAPTION_COLUMNS, "caption", source)
            base = Path(root).expanduser() if root else source.parent
            rows = ((f"{source} row {i}", row) for i, row in enumerate(rows, start=1))
            clips, problems = _listed_clips(rows, vcol, ccol, base)
    for problem in problems:
        logger.warning("skipping %s", problem)
    if not clips:
        detail = f" ({len(problems)} entries left out, first: {problems[0]})" if problems else ""
        raise ValueError(f"no usable clips in {source}{detail}")
    return clips, problems


# -- decoding -----------------------------------------------------------------------------------------
def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


def _fps_step(fps: float | None, source_fps: float | None) -> float:
    """Source frames per target frame for "fps" sampling."""
    if not fps or fps <= 0:
        raise ValueError(f"frame sampling 'fps' needs a target frame rate > 0 (data.fps), got {fps!r}")
    if not source_fps or source_fps <= 0:
        raise ValueError("has no frame rate in its header, which frame sampling 'fps' needs")
    return source_fps / fps


def _half_last(times: Sequence[float]) -> float:
    """Half the interval before a variable-rate clip's last frame: "fps" sampling takes the last frame up to
    that long after it (as round(k * step) <= n - 1 does at a constant rate)."""
    return (times[-1] - times[-2]) / 2 if len(times) > 1 else 0.0


def _time_fits(t: float, times: Sequence[float]) -> bool:
    """Whether time `t` (seconds from the first frame) is within a variable-rate clip for "fps" sampling."""
    return t <= times[-1] or t - times[-1] < _half_last(times) - 1e-9


def _nearest_frame(t: float, times: Sequence[float]) -> int:
    """The frame whose time is nearest `t` (a tie: the later one, as rounding half up does)."""
    j = bisect.bisect_left(times, t)
    if j == len(times):
        return j - 1
    if j > 0 and t - times[j - 1] < times[j] - t - 1e-9:
        return j - 1
    return j


def sample_frame_indices(num_available: int, num_frames: int, mode: str = "uniform", *,
                         fps: float | None = None, source_fps: float | None = None,
                         times: Sequence[float] | None = None) -> list[int]:
    """Indices of `num_frames` frames out of `num_available`.

    "uniform": spread evenly over the whole clip (first and last frame included); "first": the
    first `num_frames`; "stride" (VideoREPA as released, `finetune/datasets/utils.py`,
    `preprocess_video_with_resize_with_frame_idxs`): every (num_available // num_frames)-th frame from
    frame 0, and a shorter clip padded with its last frame; "fps": from frame 0 at `fps` frames per
    second, frame k being the source frame nearest time k / fps, i.e. round(k * source_fps / fps) (a
    source slower than `fps` repeats frames). `times` (a variable-frame-rate clip, `VideoInfo.times`:
    each frame's time in seconds from the first): "fps" takes the frame whose time is nearest k / fps, up to
    half a frame interval after the last frame; the other modes count frames, whatever their times.
    Raises ValueError when the clip is too short ("uniform", "first", "fps") or empty, or for "fps" without
    both rates (without `fps` and `times`).
    """
    if mode not in SAMPLING_MODES:
        raise ValueError(f"frame sampling must be one of {SAMPLING_MODES}, got {mode!r}")
    if mode == "fps" and times:
        _fps_step(fps, 1.0)
        last = (num_frames - 1) / fps
        if not _time_fits(last, times):
            raise ValueError(f"has {len(times)} frames at a variable frame rate over {times[-1]:.3f} s, fewer than "
                             f"the {num_frames} frames at {fps:g} fps need (the last at {last:.3f} s)")
        return [_nearest_frame(k / fps, times) for k in range(num_frames)]
    if mode == "fps":
        step = _fps_step(fps, source_fps)
        need = _round_half_up((num_frames - 1) * step) + 1
        if num_available < need:
            raise ValueError(f"has {num_available} frames, fewer than the {need} needed for {num_frames} frames "
                             f"at {fps:g} fps (source {source_fps:g} fps)")
        return [_round_half_up(k * step) for k in range(num_frames)]
    if mode == "stride" and num_available > 0:
        if num_available < num_frames:
            return list(range(num_available)) + [num_available - 1] * (num_frames - num_available)
        return list(range(0, num_available, num_available // num_frames))[:num_frames]
    if num_available < num_frames:
        raise ValueError(f"has {num_available} frames, fewer than the {num_frames} needed")
    if mode == "first" or num_frames == 1:
        return list(range(num_frames))
    return np.linspace(0, num_available - 1, num_frames).round().astype(int).tolist()


def frames_available(num_available: int, mode: str = "uniform", *, fps: float | None = None,
                     source_fps: float | None = None, times: Sequence[float] | None = None) -> int:
    """The most frames `sample_frame_indices` can take from a clip of `num_available` frames: the count
    itself, or for "fps" the number of frames at the target rate (by `times` for a variable-rate clip)."""
    if mode != "fps":
        return num_available
    if times:
        _fps_step(fps, 1.0)
        f = max(1, int((times[-1] + _half_last(times)) * fps))
        while f > 1 and not _time_fits((f - 1) / fps, times):
            f -= 1
        while _time_fits(f / fps, times):
            f += 1
        return f
    step = _fps_step(fps, source_fps)
    f = max(0, int((num_available - 0.5) / step) + 1)
    while f > 0 and _round_half_up((f - 1) * step) > num_available - 1:
        f -= 1
    while _round_half_up(f * step) <= num_available - 1:
        f += 1
    return f


def _video_name(source) -> str:
    """How messages name a video source: its path, its `DatasetVideo`, or "<N bytes>"."""
    return f"<{len(source)} bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)


def _open_video(source, name: str | None = None):
    """An open PyAV container with a video stream, from a path, bytes (decoded from a BytesIO, seekable: the
    same streaming decode as a file) or a `DatasetVideo`; ValueError naming the source (`name`) otherwise."""
    import av

    name = name or _video_name(source)
    try:
        if isinstance(source, DatasetVideo):
            source = source.read_bytes()
        file = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else str(source)
        container = av.open(file)
    except Exception as err:  # PyAV raises many types for bad files
        raise ValueError(f"cannot read video {name}: {err}") from err
    if not container.streams.video:
        container.close()
        raise ValueError(f"cannot read video {name}: no video stream")
    return container


def _frame_rate(stream) -> Fraction | None:
    """Frames per second: FFmpeg's guess (the nominal rate, exact: 30000/1001) when it is within 2% of the
    average (frame count / duration when the header has both, as GIF's average rate is off; else the
    average rate), else the average; None when unknown."""
    average = stream.average_rate
    if stream.frames and stream.duration and stream.time_base:
        average = Fraction(stream.frames) / (Fraction(stream.duration) * Fraction(stream.time_base))
    guess = stream.guessed_rate
    if guess and average and abs(Fraction(guess) / Fraction(average) - 1) < Fraction(1, 50):
        return Fraction(guess)
    rate = average or guess
    return Fraction(rate) if rate else None


def _packet_pts(container, stream, path) -> list:
    """The presentation timestamps of the stream's packets, read (not decoded) from the current position."""
    try:
        return [packet.pts for packet in container.demux(stream) if packet.size]
    except Exception as err:
        raise ValueError(f"cannot read video {path}: {err}") from err


def _follow_rate(stamps: Sequence[int], rate: Fraction, time_base: Fraction) -> bool:
    """Whether sorted timestamps are those of frames 0, 1, 2, ... at a constant `rate` (each rounds to its place)."""
    frame = (np.asarray(stamps, np.float64) - stamps[0]) * float(Fraction(time_base) * rate)
    return bool(np.array_equal(np.floor(frame + 0.5 + 1e-9), np.arange(len(stamps))))


def _variable_pts(container, stream, rate, frames: int, pts: list | None, path) -> tuple[list[int] | None, bool]:
    """(pts, scanned): the sorted timestamps of every frame for a variable-frame-rate stream, None for a constant
    rate (frame i at i / rate); `scanned` when the packets were read here (the container needs a seek back).

    A constant rate is read off the header when it can be: a full sample index (mp4, mov) whose decode
    timestamps follow the rate, or (no full index) FFmpeg's guessed rate agreeing with the average; else
    (or with `pts`, the packets already read) the packets' timestamps are checked."""
    tb = stream.time_base
    if not rate or tb is None:
        return None, False
    scanned = False
    if pts is None:
        entries = getattr(stream, "index_entries", None) or ()  # PyAV >= 14
        if frames > 1 and len(entries) == frames:
            if _follow_rate([e.timestamp for e in entries], rate, tb):
                return None, False
        elif stream.guessed_rate and Fraction(stream.guessed_rate) == rate:
            return None, False
        pts, scanned = _packet_pts(container, stream, path), True
    if len(pts) < 2 or None in pts:
        return None, scanned
    pts = sorted(pts)
    return (None if _follow_rate(pts, rate, tb) else pts), scanned


def _stream_info(container, path) -> tuple[VideoInfo, bool, list[int] | None]:
    """(info, rewind, pts): `rewind` when the packets were read (to count them when the header has no
    count, or for the timestamps of a variable-rate stream): the container then needs a seek back before
    decoding; `pts`: the sorted frame timestamps of a variable-rate stream, else None (`_variable_pts`)."""
    stream = container.streams.video[0]
    rate = _frame_rate(stream)
    frames, pts = int(stream.frames or 0), None
    if frames <= 0:
        pts = _packet_pts(container, stream, path)
        frames = len(pts)
    counted = pts is not None
    pts, scanned = _variable_pts(container, stream, rate, frames, pts, path)
    times = None
    if pts is not None:
        frames = len(pts)
        times = tuple(float((t - pts[0]) * stream.time_base) for t in pts)
    cc = stream.codec_context
    info = VideoInfo(frames, float(rate) if rate else None, int(cc.height), int(cc.width), times)
    return info, counted or scanned, pts


def probe_video(path) -> VideoInfo:
    """Frame count, rate, size and (variable frame rate) frame times of a video (a path, bytes or `DatasetVideo`)
    from its header, no frame decoded; the packets are read when the header has no count, or for the
    timestamps of a variable-rate stream (`_variable_pts`). ValueError naming it when it cannot be read."""
    with _open_video(path) as container:
        return _stream_info(container, _video_name(path))[0]


def _decoded_frames(container, stream):
    """Every frame the decoder gives from the container's current position (a spy point for tests)."""
    yield from container.decode(stream)


def _read_frames(container, indices: Sequence[int], path, rewind: bool = False,
                 pts: Sequence[int] | None = None) -> np.ndarray:
    """Decode frames `indices` of the container's first video stream -> uint8 [len(indices), H, W, 3].

    A frame's index is its position in `pts` (a variable-rate stream's sorted frame timestamps), else its
    timestamp times the frame rate (counted in decoding order when the stream has no rate). Seeks to the
    keyframe before the first index and decodes forward, seeking again when the next index is further ahead
    than the longest keyframe interval seen; after a seek, frames before the first keyframe are dropped and
    a seek that lands past the wanted frame is retried from further back (that margin kept for the later seeks).
    Only the wanted frames are converted to RGB. `rewind`: the container was read before (seek to the start).
    """
    stream = container.streams.video[0]
    wanted = sorted(set(int(i) for i in indices))
    if not wanted or wanted[0] < 0:
        raise ValueError(f"video {path}: bad frame indices {list(indices)[:5]}")
    rate = _frame_rate(stream)
    tb = stream.time_base
    start = stream.start_time or 0
    timed = (bool(rate) and tb is not None) or bool(pts)
    slots: dict[int, list[int]] = {}  # frame index -> its positions in the output
    for k, j in enumerate(indices):
        slots.setdefault(int(j), []).append(k)
    out = None
    i, gop, backoff, last_idx = 0, None, 0, -1
    target = wanted[0] if timed else 0
    while i < len(wanted):
        target = max(0, target - backoff)
        if target > 0 or rewind:  # to frame `target`'s timestamp, or the last one that still rounds to it
            if pts:
                offset = pts[min(target, len(pts) - 1)]
            elif timed:
                offset = start + math.ceil((target + Fraction(1, 2)) / (rate * Fraction(tb))) - 1
            else:
                offset = start
            container.seek(int(offset), stream=stream, backward=True, any_frame=False)
        rewind = True  # every later pass starts with a seek
        trusted = target == 0  # from the start every frame is usable; after a seek, from the first keyframe on
        counter, last_key, reseek = 0, None, False
        for frame in _decoded_frames(container, stream):
            if frame.pts is not None and pts:
                idx = bisect.bisect_left(pts, frame.pts)
                if idx == len(pts) or (idx > 0 and pts[idx] != frame.pts and
                                       frame.pts - pts[idx - 1] < pts[idx] - frame.pts):
                    idx -= 1  # not a listed timestamp (it should be): the nearest frame
            elif frame.pts is not None and timed:
                idx = _round_half_up(float((frame.pts - start) * tb * rate))
            elif target == 0:
                idx = counter
            else:
                raise ValueError(f"video {path}: frames without timestamps, cannot seek")
            counter += 1
            if not trusted:
                if not frame.key_frame:
                    continue
                trusted = True
                if idx > wanted[i]:  # landed past the frame (open GOP, B-frames): seek from further back,
                    backoff = max(2 * backoff, idx - target + 2)  # and keep that margin for later seeks
                    reseek = True
                    break
                if gop is not None:  # the keyframe before wanted[i]: keyframes are at least this far apart
                    gop = max(gop, wanted[i] - idx + 1)
            if frame.key_frame:
                if last_key is not None and idx > last_key:
                    gop = max(gop or 0, idx - last_key)
                last_key = idx
            last_idx = idx
            if idx < wanted[i]:
                if timed and gop is not None and wanted[i] - idx > gop:  # the next keyframe is still before it
                    target, reseek = wanted[i], True
                    break
                continue
            rgb = frame.to_ndarray(format="rgb24")
            if out is None:
                out = np.empty((len(indices), *rgb.shape), np.uint8)
            while i < len(wanted) and wanted[i] <= idx:
                out[slots[wanted[i]]] = rgb
                i += 1
            if i == len(wanted):
                break
            if timed and gop is not None and wanted[i] - idx > gop:
                target, reseek = wanted[i], True
                break
        if not reseek:
            break
    if i < len(wanted):
        raise ValueError(f"video {path}: the stream ends at frame {last_idx}, before frame {wanted[i]}")
    return out


def decode_frames(path, indices: Sequence[int]) -> np.ndarray:
    """Decode only frames `indices` of a video (a path, bytes or `DatasetVideo`; PyAV, see `_read_frames`)
    -> uint8 [len(indices), H, W, 3].

    ValueError naming the video when it cannot be read or ends before an index.
    """
    name = _video_name(path)
    with _open_video(path) as container:
        try:
            _, rewind, pts = _stream_info(container, name)
            return _read_frames(container, indices, name, rewind=rewind, pts=pts)
        except ValueError:
            raise
        except Exception as err:  # decoder errors of a damaged file
            raise ValueError(f"cannot read video {name}: {err}") from err


def resize_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[F, 3, h, w] -> [F, 3, height, width]: scale so the frame covers the target (bilinear, antialiased), centre crop."""
    h, w = frames.shape[-2:]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        frames = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return frames[..., top : top + height, left : left + width].clamp(0.0, 1.0)


def _to_tensor(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 [F, h, w, 3] -> float [F, 3, height, width] in [0, 1], converted a few frames at a time."""
    out = torch.empty(len(frames), 3, height, width)
    for k in range(0, len(frames), _RESIZE_CHUNK):
        x = torch.from_numpy(np.ascontiguousarray(frames[k : k + _RESIZE_CHUNK])).permute(0, 3, 1, 2)
        x = x.float().div_(255.0)
        out[k : k + _RESIZE_CHUNK] = resize_crop(x, height, width)
    return out


def load_clip(path, num_frames: int, height: int, width: int, sampling: str = "uniform",
              fps: float | None = None, *, name: str | None = None) -> torch.Tensor:
    """Decode the sampled frames of a video (a path, bytes or `DatasetVideo`) and return
    [num_frames, 3, height, width] float32 in [0, 1].

    Only the sampled frames are decoded (`_read_frames`). Raises ValueError naming the video (`name`, else
    its path) when it cannot be decoded or is too short.
    """
    name = name or _video_name(path)
    with _open_video(path, name) as container:
        try:
            info, rewind, pts = _stream_info(container, name)
            idx = sample_frame_indices(info.frames, num_frames, sampling, fps=fps, source_fps=info.fps,
                                       times=info.times)
            frames = _read_frames(container, idx, name, rewind=rewind, pts=pts)
        except ValueError as err:
            msg = str(err)
            raise ValueError(msg if name in msg else f"video {name} {msg}") from None
        except Exception as err:  # decoder errors of a damaged file
            raise ValueError(f"cannot read video {name}: {err}") from err
    return _to_tensor(frames, height, width)


# -- buckets ------------------------------------------------------------------------------------------
def assign_bucket(info: VideoInfo, buckets: Sequence[Sequence[int]], sampling: str = "uniform",
                  fps: float | None = None) -> int | None:
    """Index of the bucket (frames, height, width) for a clip, or None when it is shorter than every bucket.

    Among the buckets whose frame count the clip can give (`frames_available`), the nearest aspect
    ratio (|log(w/h) - log(W/H)|) wins, then the nearest length (the most frames), then the first listed.
    """
    avail = frames_available(info.frames, sampling, fps=fps, source_fps=info.fps, times=info.times)
    fits = [b for b, (f, _, _) in enumerate(buckets) if f <= avail]
    if not fits:
        return None
    aspect = math.log(info.width / info.height)

    def distance(b: int) -> tuple:
        f, h, w = buckets[b]
        return round(abs(math.log(w / h) - aspect), 9), avail - f, b

    return min(fits, key=distance)


def bucket_clips(clips: Sequence[Clip], buckets: Sequence[Sequence[int]], sampling: str = "uniform",
                 fps: float | None = None, index: str | os.PathLike | None = None) -> tuple[list[int | None], list[str]]:
    """Each clip's bucket (`assign_bucket`, from its header: `probe_videos`, with the header `index`), None
    for a clip left out.

    Returns (bucket per clip, paths left out). A clip that cannot be read, or is shorter than every
    bucket, is left out with a warning naming it. ValueError when no clip fits any bucket.
    """
    out, left_out = [], []
    fewest = min(f for f, _, _ in buckets)
    for clip, info in zip(clips, probe_videos([c.video for c in clips], index)):
        try:
            if isinstance(info, ValueError):
                raise info
            b = assign_bucket(info, buckets, sampling, fps)
            if b is None:
                avail = frames_available(info.frames, sampling, fps=fps, source_fps=info.fps, times=info.times)
                at = f" at {fps:g} fps" if sampling == "fps" else ""
                raise ValueError(f"{avail} frames{at}, shorter than every bucket in data.buckets (fewest: {fewest})")
        except ValueError as err:
            logger.warning("skipping clip %s: %s", clip.video, err)
            left_out.append(str(clip.video))
            b = None
        out.append(b)
    if len(left_out) == len(clips):
        raise ValueError(f"none of the {len(clips)} clips fits a bucket of data.buckets {list(map(list, buckets))} "
                         f"(first: {left_out[0]}); see the warnings above")
    return out, left_out


class VideoClipDataset(Dataset):
    """Clips -> {"video": [F, 3, H, W] in [0, 1], "caption", "index", "skipped": [paths]}.

    `shapes` (one (frames, height, width) per clip, from its bucket) replaces num_frames / height / width
    per clip. With `cache` and `keys` (one fingerprint per clip), items are read from the cache instead:
    {"latent_params", "prompt_embeds", optionally "teacher", "caption", "index", "skipped"}.
    A clip that fails to load is skipped (warning) and the next one of the same shape taken, deterministically.
    """

    def __init__(self, clips: Sequence[Clip], *, num_frames: int, height: int, width: int,
                 sampling: str = "uniform", fps: float | None = None, shapes: Sequence[Sequence[int]] | None = None,
                 cache: "FeatureCache | None" = None, keys: Sequence[str] | None = None):
        if not clips:
            raise ValueError("VideoClipDataset needs at least one clip")
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"frame sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
        if sampling == "fps":
            _fps_step(fps, 1.0)
        if cache is not None and (keys is None or len(keys) != len(clips)):
            raise ValueError("a cached dataset needs one key per clip")
        if shapes is not None and len(shapes) != len(clips):
            raise ValueError(f"{len(shapes)} shapes for {len(clips)} clips; give one (frames, height, width) per clip")
        self.clips = list(clips)
        self.num_frames, self.height, self.width, self.sampling, self.fps = num_frames, height, width, sampling, fps
        self.shapes = [tuple(int(v) for v in sh) for sh in shapes] if shapes is not None else None
        self.cache, self.keys = cache, list(keys) if keys is not None else None

    def __len__(self) -> int:
        return len(self.clips)

    def shape(self, i: int) -> tuple[int, int, int]:
        """(frames, height, width) of clip i's items."""
        return self.shapes[i] if self.shapes is not None else (self.num_frames, self.height, self.width)

    def _load(self, i: int) -> dict:
        clip = self.clips[i]
        if self.cache is not None:
            item = self.cache.load(self.keys[i])
            if item is None:
                raise ValueError(f"cache entry for {clip.video} is missing")
            return item
        return {"video": load_clip(clip.video, *self.shape(i), self.sampling, self.fps)}

    def _candidates(self, index: int) -> list[int]:
        """`index`, then the clips after it (cyclically) of the same shape: the stand-ins for a bad clip."""
        n = len(self.clips)
        order = [(index + k) % n for k in range(n)]
        if self.shapes is None:
            return order
        return [i for i in order if self.shapes[i] == self.shapes[index]]

    def __getitem__(self, index: int) -> dict:
        skipped = []
        candidates = self._candidates(index)
        for i in candidates:
            try:
                item = self._load(i)
            except Exception as err:  # any decoding problem: skip this clip, never stop the run
                logger.warning("skipping clip %s: %s", self.clips[i].video, err)
                skipped.append(str(self.clips[i].video))
                continue
            item.update(caption=self.clips[i].caption, index=i, skipped=skipped)
            return item
        raise RuntimeError(f"none of the {len(candidates)} clips could be read (first failure: {skipped[0]})")


def collate_clips(items: list[dict]) -> dict:
    """Stack tensors, keep captions / indices as lists, concatenate the skipped paths; a shard stream's
    items: the "cursor" of the last one (where its reader stands after this batch) and their "key"s."""
    out = {"caption": [it["caption"] for it in items], "index": [it["index"] for it in items],
           "skipped": [p for it in items for p in it["skipped"]]}
    if "cursor" in items[-1]:
        out["cursor"], out["key"] = items[-1]["cursor"], [it["key"] for it in items]
    for key in items[0]:
        if isinstance(items[0][key], torch.Tensor):
            out[key] = torch.stack([it[key] for it in items])
    return out


class ResumableBatchSampler(Sampler):
    """This process's batches of dataset indices, endless, resumable at any batch.

    Epoch e is a permutation of range(n) drawn from `seed + e`; it is cut into global batches of
    `batch_size * num_replicas` (the remainder dropped) and process `rank` takes its slice of each.
    Iteration starts at global batch `start` (counted across epochs), so a resumed run reads the
    same batches as an uninterrupted one, without decoding the ones it skips.
    """

    def __init__(self, n: int, batch_size: int, *, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, start: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.num_replicas, self.rank = n, batch_size, num_replicas, rank
        self.seed, self.shuffle, self.start = seed, shuffle, start
        self.batches_per_epoch = n // (batch_size * num_replicas)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{n} usable clips are fewer than one global batch "
                             f"({batch_size} per process x {num_replicas} processes)")

    def epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start
        while True:
            epoch, b = divmod(position, self.batches_per_epoch)
            order = self.epoch_order(epoch)
            global_size = self.batch_size * self.num_replicas
            for j in range(b, self.batches_per_epoch):
                first = j * global_size + self.rank * self.batch_size
                yield order[first : first + self.batch_size]
                position += 1

    def __len__(self) -> int:  # endless; one epoch for tools that ask
        return self.batches_per_epoch


class BucketBatchSampler(Sampler):
    """This process's batches of dataset indices, every batch from one bucket; endless, resumable at any batch.

    `buckets[i]` is clip i's bucket (None: left out). Bucket b's clips are cut into global batches of
    `batch_size * num_replicas` (its remainder dropped) in a permutation drawn from the bucket's seed plus
    its own epoch; one epoch of the sampler takes every bucket's batches once, in an order drawn from
    `seed + epoch`; process `rank` takes its slice of each global batch, so all processes read the same
    bucket at each step. A bucket with fewer clips than one global batch is left out with a warning.

    State (`state_at(k)`, the position after k global batches, for checkpoints):
    {"seed", "position": k, "buckets": [{"clips", "seed", "position": batches of this bucket so far}]}.
    Iteration starts from `state` when given (its seeds are used from then on), else from global batch
    `start`. A state saved for other buckets (other clip counts) is ignored with a warning.
    """

    def __init__(self, buckets: Sequence[int | None], batch_size: int, *, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True, start: int = 0, state: dict | None = None,
                 names: Sequence[str] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n_buckets = max((b for b in buckets if b is not None), default=-1) + 1
        self.members = [[i for i, b in enumerate(buckets) if b == k] for k in range(n_buckets)]
        self.batch_size, self.num_replicas, self.rank, self.shuffle = batch_size, num_replicas, rank, shuffle
        global_size = batch_size * num_replicas
        self.batches = [len(m) // global_size for m in self.members]
        for k, m in enumerate(self.members):
            if m and not self.batches[k]:
                name = names[k] if names is not None else k
                logger.warning("bucket %s: its %d clips are fewer than one global batch (%d per process x %d "
                               "processes); they are left out", name, len(m), batch_size, num_replicas)
        self.total = sum(self.batches)
        if self.total == 0:
            raise ValueError(f"no bucket has a global batch of clips ({batch_size} per process x {num_replicas} "
                             f"processes); clips per bucket: {[len(m) for m in self.members]}")
        self.seed = seed
        self.bucket_seeds = [seed + 1_000_003 * (k + 1) for k in range(n_buckets)]
        self._orders: dict[int, tuple[int, list[int]]] = {}
        if state is not None and self._state_fits(state, start):
            self.seed = int(state["seed"])
            self.bucket_seeds = [int(b["seed"]) for b in state["buckets"]]
            self.state = {"seed": self.seed, "position": int(state["position"]),
                          "buckets": [dict(b) for b in state["buckets"]]}
        else:
            self.state = self.state_at(start)

    def _state_fits(self, state: dict, start: int) -> bool:
        clips = [len(m) for m in self.members]
        saved = [b.get("clips") for b in state.get("buckets", [])]
        if saved != clips or state.get("position") != start:
            logger.warning("the saved data position (clips per bucket %s, batch %s) does not fit this run's "
                           "(clips per bucket %s, batch %s); the clips or data.buckets changed: restarting the "
                           "buckets' order at batch %s", saved, state.get("position"), clips, start, start)
            return False
        return True

    def schedule(self, epoch: int) -> np.ndarray:
        """Bucket of each global batch of sampler epoch `epoch` -> int [total]."""
        ids = np.repeat(np.arange(len(self.batches)), self.batches)
        if not self.shuffle:
            return ids
        g = torch.Generator().manual_seed(self.seed + epoch)
        return ids[torch.randperm(len(ids), generator=g).numpy()]

    def state_at(self, position: int) -> dict:
        """The state after `position` global batches (see the class docstring)."""
        epoch, offset = divmod(position, self.total)
        counts = np.bincount(self.schedule(epoch)[:offset], minlength=len(self.batches))
        return {"seed": self.seed, "position": position,
                "buckets": [{"clips": len(m), "seed": s, "position": epoch * nb + int(c)}
                            for m, s, nb, c in zip(self.members, self.bucket_seeds, self.batches, counts)]}

    def _batch(self, b: int, position: int) -> list[int]:
        """This process's part of bucket b's global batch number `position` (counted across its epochs)."""
        epoch, j = divmod(position, self.batches[b])
        if self._orders.get(b, (None,))[0] != epoch:
            n = len(self.members[b])
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.bucket_seeds[b] + epoch)).tolist() \
                if self.shuffle else list(range(n))
            self._orders[b] = (epoch, order)
        order = self._orders[b][1]
        first = j * self.batch_size * self.num_replicas + self.rank * self.batch_size
        return [self.members[b][i] for i in order[first : first + self.batch_size]]

    def __iter__(self) -> Iterator[list[int]]:
        position = self.state["position"]
        per_bucket = [b["position"] for b in self.state["buckets"]]
        while True:
            epoch, offset = divmod(position, self.total)
            for b in self.schedule(epoch)[offset:].tolist():
                yield self._batch(b, per_bucket[b])
                per_bucket[b] += 1
                position += 1

    def __len__(self) -> int:  # endless; one epoch for tools that ask
        return self.total


# -- WebDataset shards --------------------------------------------------------------------------------
def _is_url(shard: str) -> bool:
    return shard.startswith("pipe:") or "://" in shard


def is_shard_source(source: str | os.PathLike) -> bool:
    """Whether `source` names WebDataset shards: a path, URL or brace pattern ending in .tar
    (`shards/train-{000000..000009}.tar`), or a folder holding .tar files and no videos."""
    text = str(source)
    if text.lower().endswith(".tar"):
        return True
    folder = Path(text).expanduser()
    if not folder.is_dir():
        return False
    suffixes = {p.suffix.lower() for p in folder.iterdir() if p.is_file()}
    return ".tar" in suffixes and not suffixes & set(VIDEO_EXTENSIONS)


def expand_shards(source: str | os.PathLike) -> list[str]:
    """The shards of a WebDataset source: a folder's .tar files by name, or a brace pattern expanded
    (webdataset's `expand_urls`; patterns joined by "::" too). FileNotFoundError naming a local shard
    that does not exist, ValueError when there is none."""
    from webdataset.shardlists import expand_urls

    folder = Path(str(source)).expanduser()
    if folder.is_dir():
        shards = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() == ".tar" and p.is_file())
    else:
        shards = [s if _is_url(s) else str(Path(s).expanduser()) for s in expand_urls(str(source))]
    missing = [s for s in shards if not _is_url(s) and not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"training data {source}: {len(missing)} of {len(shards)} shards do not exist "
                                f"(first: {missing[0]})")
    if not shards:
        raise ValueError(f"no .tar shards in {source}")
    return shards


def _sample_video(sample: dict) -> str | None:
    """The key of a WebDataset sample's video member (its extension: mp4, webm, mkv, ...), None without one."""
    return next((k for k in sample if not k.startswith("__") and k.rsplit(".", 1)[-1] in _VIDEO_MEMBERS), None)


def _sample_caption(sample: dict) -> str:
    """A WebDataset sample's caption: its .txt member, else the caption field of its .json member ("" if none)."""
    if sample.get("txt") is not None:
        return sample["txt"].decode("utf-8").strip()
    if sample.get("json") is not None:
        meta = json.loads(sample["json"])
        if isinstance(meta, dict):
            lower = {str(k).lower().strip(): v for k, v in meta.items()}
            return next((str(lower[c]).strip() for c in _CAPTION_COLUMNS if lower.get(c)), "")
    return ""


class WebDatasetClips(IterableDataset):
    """WebDataset shards streamed as `VideoClipDataset`'s items: {"video": [F, 3, H, W] in [0, 1], "caption",
    "key": "shard:sample key", "index": items so far in this stream, "skipped": [...]}.

    A sample is `key.mp4` (or .webm, .mkv, ...) with `key.txt` (the caption) or `key.json` (a caption
    field, named as manifest columns are). Epoch e orders the shards by a permutation drawn from
    `seed + e`; process `rank` of `world` takes every world-th shard of it and DataLoader worker w of n
    every n-th of those, so each shard is read once per epoch, by one worker of one process. rank and
    world default to the launcher's RANK / WORLD_SIZE (accelerate launch, torchrun) or torch.distributed.
    One iteration reads `epochs` epochs from `epoch` on (None: endless, as training wants, so that no
    process runs dry before the others).

    A sample that cannot be used (an undecodable or too short video, no caption, an unreadable tar
    member, which loses the rest of that shard) is skipped with a warning naming the shard and the
    member, and "shard:member" goes into the next item's "skipped", the list `collate_clips` hands the
    trainer for its skipped count. (A damaged tar header after the first member ends the shard there
    without an error: Python's tarfile takes it for the archive's end.) Videos decode from their bytes
    with `load_clip`: only the sampled frames.

    Resuming: each item carries "cursor", where its reader (a DataLoader worker, the role `reader` of
    `readers`) stands after it: {"reader", "readers", "epoch", "shard": index in that reader's shards of
    the epoch, "sample": samples (tar groups, the unusable ones too) read of that shard, "count": items
    so far}. `ShardStreamPosition` keeps the cursors of the batches consumed; its `state()` given as
    `state` makes the next iteration go on from there: DataLoader worker w plays reader (w + next) % n,
    since the DataLoader takes batches from its workers 0, 1, ... in turn, and each reader passes over
    the samples before its cursor without decoding them. A state of another reader count, process,
    shard list, seed or shuffle is ignored with a warning (`state_problem`): the iteration starts at
    `epoch`, as without one.
    """

    def __init__(self, shards: str | os.PathLike | Sequence[str], *, num_frames: int, height: int, width: int,
                 sampling: str = "uniform", fps: float | None = None, seed: int = 0, shuffle: bool = True,
                 epoch: int = 0, epochs: int | None = 1, rank: int | None = None, world: int | None = None,
                 state: dict | None = None):
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"frame sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
        if sampling == "fps":
            _fps_step(fps, 1.0)
        if (rank is None) != (world is None) or (world is not None and not 0 <= rank < world):
            raise ValueError(f"give rank and world together, 0 <= rank < world; got rank={rank}, world={world}")
        self.shards = expand_shards(shards) if isinstance(shards, (str, os.PathLike)) else [str(s) for s in shards]
        self.num_frames, self.height, self.width, self.sampling, self.fps = num_frames, height, width, sampling, fps
        self.seed, self.shuffle, self.epoch, self.epochs = seed, shuffle, epoch, epochs
        self.rank, self.world, self.state = rank, world, state

    @property
    def identity(self) -> str:
        """A digest of what orders the stream (shards, seed, shuffle): a saved position holds it."""
        return hashlib.sha256(json.dumps([self.shards, self.seed, self.shuffle]).encode()).hexdigest()[:16]

    def _rank_world(self) -> tuple[int, int]:
        if self.world is not None:
            return self.rank, self.world
        import webdataset as wds

        return tuple(wds.utils.pytorch_worker_info()[:2])

    def state_problem(self, state: dict | None, readers: int) -> str | None:
        """Why `state` (`ShardStreamPosition.state()`) cannot resume this stream read by `readers` readers
        (DataLoader workers, 1 for none); None when it can."""
        if not isinstance(state, dict) or state.get("kind") != "shards":
            return "the checkpoint holds no shard stream position"
        rank, world = self._rank_world()
        if state.get("readers") != readers:
            return (f"the shard position was saved with {state.get('readers')} DataLoader reader(s), this run "
                    f"has {readers} (data.num_workers changed)")
        if (state.get("rank"), state.get("world")) != (rank, world):
            return (f"the shard position was saved by process {state.get('rank')} of {state.get('world')}, "
                    f"this is process {rank} of {world}")
        if state.get("stream") != self.identity:
            return "the shards, data.shuffle or seed changed since the shard position was saved"
        cursors = state.get("cursors")
        if not isinstance(cursors, list) or len(cursors) != readers or not 0 <= state.get("next", -1) < readers:
            return "the saved shard position is malformed"
        return None

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration starts at."""
        self.epoch = epoch

    def shards_for(self, epoch: int, rank: int = 0, world: int = 1, worker: int = 0, workers: int = 1) -> list[str]:
        """The shards, in reading order, of DataLoader worker `worker` of `workers` of process `rank` of `world`
        in `epoch`."""
        order = range(len(self.shards))
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(len(self.shards), generator=g).tolist()
        return [self.shards[i] for i in list(order)[rank::world][worker::workers]]

    def _item(self, sample: dict, video: str | None, member: str) -> dict:
        if video is None:
            raise ValueError(f"no video member ({', '.join(VIDEO_EXTENSIONS)})")
        caption = _sample_caption(sample)
        if not caption:
            raise ValueError("no caption (a .txt member, or a caption field in a .json member)")
        frames = load_clip(sample[video], self.num_frames, self.height, self.width, self.sampling, self.fps,
                           name=member)
        return {"video": frames, "caption": caption, "key": f"{sample['__url__']}:{sample['__key__']}"}

    def __iter__(self) -> Iterator[dict]:
        import webdataset as wds
        from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

        env_rank, env_world, worker, workers = wds.utils.pytorch_worker_info()
        rank, world = (env_rank, env_world) if self.world is None else (self.rank, self.world)
        if len(self.shards) < world:
            raise ValueError(f"{len(self.shards)} shards for {world} processes: each process needs at least one")
        state = self.state
        problem = self.state_problem(state, workers) if state is not None else None
        if problem:
            logger.warning("%s: the shard stream starts afresh at epoch %d", problem, self.epoch)
            state = None
        reader = worker if state is None else (worker + state["next"]) % workers
        cursor = state["cursors"][reader] if state is not None else {"epoch": self.epoch, "shard": 0, "sample": 0,
                                                                     "count": 0}
        pending: list[str] = []  # skipped since the last item
        where = {"url": None, "member": None, "read": None}  # shard; tar member being read; last one read whole

        def skip(name: str, err) -> None:
            if name not in pending:  # a bad tar member is reported twice by webdataset
                logger.warning("skipping %s: %s", name, err)
                pending.append(name)

        def select(member: str) -> bool:
            where["member"] = member
            return member.rsplit(".", 1)[-1].lower() in _SHARD_MEMBERS

        def read_whole(files):
            for file in files:
                where["read"] = file.get("fname", where["read"])
                yield file

        def handler(err: Exception) -> bool:  # an unreadable shard or member: the rest of the shard is lost
            url, member, read = where["url"], where["member"], where["read"]
            if member is None:
                skip(url, err)
            else:  # failed reading `member`, or the header after it
                skip(f"{url}:{member}" if member != read else f"{url}:(the member after {member})", err)
            return True

        def samples(url: str):
            """The samples of one shard: webdataset's tar reading, with a tap on the members read whole."""
            where.update(url=url, member=None, read=None)
            files = tar_file_expander(url_opener([{"url": url}], handler=handler), handler=handler, select_files=select)
            return group_by_keys(read_whole(files), handler=handler)

        count, epoch = int(cursor["count"]), int(cursor["epoch"])
        first, passed = int(cursor["shard"]), int(cursor["sample"])  # shard to start at, its samples to pass over
        end = None if self.epochs is None else epoch + self.epochs
        while end is None or epoch < end:
            before, whole = count, first == 0 and passed == 0  # an epoch read from its start
            shards = self.shards_for(epoch, rank, world, reader, workers)
            for s in range(first, len(shards)):
                url, n = shards[s], -1
                for n, sample in enumerate(samples(url)):
                    if n < passed:  # before the cursor: passed over undecoded
                        if n == passed - 1:
                            pending.clear()  # what went wrong before the cursor was reported before it
                        continue
                    video = _sample_video(sample)
                    member = f"{url}:{sample['__key__']}" + (f".{video}" if video else "")
                    try:
                        item = self._item(sample, video, member)
                    except Exception as err:  # any problem of one sample: skip it, never stop the run
                        skip(member, err)
                        continue
                    count += 1
                    item.update(index=count - 1, skipped=pending[:],
                                cursor={"reader": reader, "readers": workers, "epoch": epoch, "shard": s,
                                        "sample": n + 1, "count": count})
                    pending.clear()
                    yield item
                if n < passed - 1:  # a shard with fewer samples than the cursor's (changed since): all passed over
                    pending.clear()
                passed = 0
            if count == before and whole:  # no usable sample (or no shard) for this worker: stop rather than spin
                if pending:
                    logger.warning("no usable sample in this reader's shards (%d skipped): it stops", len(pending))
                return
            epoch, first = epoch + 1, 0


class ShardStreamPosition:
    """Where a `WebDatasetClips` stream read by `readers` readers (DataLoader workers; 1 for none) stands
    after the batches consumed: each reader's cursor (of the last batch taken from it) and the reader of
    the next batch. `consumed(batch["cursor"])` after each batch; `state()` (a dict for checkpoints, of
    this process) is the `state` that resumes the stream there. Starts at `stream.epoch`, or at `state`."""

    def __init__(self, stream: WebDatasetClips, readers: int, state: dict | None = None):
        rank, world = stream._rank_world()
        self.fixed = {"kind": "shards", "readers": readers, "rank": rank, "world": world, "stream": stream.identity}
        if state is not None:
            self.next, self.cursors = int(state["next"]), [dict(c) for c in state["cursors"]]
        else:
            self.next = 0
            self.cursors = [{"epoch": stream.epoch, "shard": 0, "sample": 0, "count": 0} for _ in range(readers)]

    def consumed(self, cursor: dict) -> None:
        """Record a consumed batch's "cursor"."""
        reader = cursor["reader"]
        self.cursors[reader] = {k: cursor[k] for k in ("epoch", "shard", "sample", "count")}
        self.next = (reader + 1) % len(self.cursors)

    def state(self) -> dict:
        return {**self.fixed, "next": self.next, "cursors": [dict(c) for c in self.cursors]}


# -- cache --------------------------------------------------------------------------------------------
def file_digest(path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's content (hex); of its bytes for a `DatasetVideo`."""
    if isinstance(path, DatasetVideo):
        return hashlib.sha256(path.read_bytes()).hexdigest()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _stamp(path) -> tuple[str, list[int]]:
    """(index key, [size, mtime_ns]) of a file; of its dataset's arrow files for a `DatasetVideo`."""
    if isinstance(path, DatasetVideo):
        stats = [p.stat() for p in sorted(Path(path.folder).glob("*.arrow"))]
        key = f"{os.path.abspath(path.folder)}[{path.row}].{path.column}"
        return key, [sum(st.st_size for st in stats), max((st.st_mtime_ns for st in stats), default=0)]
    key = os.path.abspath(path)
    st = os.stat(key)
    return key, [st.st_size, st.st_mtime_ns]


def _indexed(paths: Sequence, index: str | os.PathLike | None, compute, what: str) -> list:
    """compute(path) for each path (or `DatasetVideo`), reusing the values recorded in the JSON file `index`
    ({key: [size, mtime_ns, value]}, `_stamp`) while size and mtime still match; the file is rewritten
    (atomically) when an entry was added or changed. A ValueError of compute is returned in the value's place,
    not recorded. `what` names the index in a warning when it cannot be read (it is then rebuilt)."""
    index = Path(index) if index is not None else None
    known: dict = {}
    if index is not None and index.is_file():
        try:
            known = json.loads(index.read_text())
        except (OSError, ValueError) as err:  # unreadable: rebuilt from the files
            logger.warning("ignoring the %s %s: %s", what, index, err)
    out, changed = [], False
    for p in paths:
        key, stamp = _stamp(p)
        entry = known.get(key)
        if not (isinstance(entry, list) and len(entry) == 3 and entry[:2] == stamp):
            try:
                entry = known[key] = [*stamp, compute(p)]
            except ValueError as err:
                out.append(err)
                continue
            changed = True
        out.append(entry[2])
    if changed and index is not None:
        with atomic_path(index) as tmp:
            tmp.write_text(json.dumps(known))
    return out


def file_digests(paths: Sequence, index: str | os.PathLike | None = None) -> list[str]:
    """`file_digest` of each path (or `DatasetVideo`), reusing the digests recorded in `index` when size and
    mtime still match.

    `index` is a JSON file {absolute path: [size, mtime_ns, sha256]}; it is rewritten (atomically) when
    an entry was added or changed. Starting a run again over the same clips then costs a stat per
    file instead of reading every video. A file whose content changed in place, keeping its size and
    its mtime to the nanosecond, is not noticed. A `DatasetVideo`'s entry is keyed by its name and
    stamped with its dataset's arrow files (total size, newest mtime): re-saving the dataset re-reads them.
    """
    return _indexed(paths, index, lambda p: file_digest(p if isinstance(p, DatasetVideo) else _stamp(p)[0]),
                    "file digest index")


def probe_videos(paths: Sequence, index: str | os.PathLike | None = None) -> list["VideoInfo | ValueError"]:
    """`probe_video` of each path (or `DatasetVideo`); a clip that cannot be read gives its ValueError in
    its place. `index`: a JSON file of the headers read before, kept as `file_digests` keeps its digests
    (size and mtime checked), so a restart over many clips costs a stat per clip."""
    def probe(p) -> list:
        info = probe_video(p)
        return [info.frames, info.fps, info.height, info.width, list(info.times) if info.times else None]

    out = _indexed(paths, index, probe, "video header index")
    return [v if isinstance(v, ValueError) else VideoInfo(*v[:4], tuple(v[4]) if v[4] else None) for v in out]


def model_identity(source: str | os.PathLike, subfolders: Sequence[str] = ()) -> str:
    """A string that changes when the model at `source` changes.

    A local folder: the content of its (and the named subfolders') config / json files plus the
    name, size and mtime of every weight file. A hub id: the id itself (pin a revision by path).
    """
    path = Path(source).expanduser()
    if not path.exists():
        return str(source)
    if path.is_file():
        st = path.stat()
        return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    h = hashlib.sha256()
    folders = [path] + [path / s for s in subfolders]
    for folder in folders:
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if not f.is_file():
                continue
            if f.suffix in (".json", ".txt", ".model", ".yaml"):
                h.update(f.name.encode() + f.read_bytes())
            else:
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"{path.resolve()}#{h.hexdigest()[:16]}"


def clip_fingerprint(clip: Clip, settings: dict, digest: str | None = None) -> str:
    """sha256 hex key of one clip's cache entry: its file content, caption and the settings dict."""
    payload = {"file": digest or file_digest(clip.video), "caption": clip.caption, "settings": settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class FeatureCache:
    """Precomputed tensors per clip, one safetensors file per fingerprint: `folder/ab/abcdef....safetensors`."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def save(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Write one entry atomically (tensors made contiguous and moved to CPU)."""
        from safetensors.torch import save_file

        with atomic_path(self.path(key)) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        """The entry's tensors, or None when there is none."""
        from safetensors.torch import load_file

        path = self.path(key)
        return load_file(str(path)) if path.is_file() else None
