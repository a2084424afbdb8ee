"""Training clips: discovery (folder or manifest), decoding, frame sampling, resumable batches, a feature cache.

    clips, problems = discover_clips("assets/clips")        # videos with a .txt caption beside each
    ds = VideoClipDataset(clips, num_frames=49, height=480, width=720)
    item = ds[0]        # {"video": [49, 3, 480, 720] float in [0, 1], "caption": str, "index": int, "skipped": [...]}

Sources: a folder (every video with a `.txt` caption beside it, searched recursively), a CSV
manifest (columns `video` / `path` / `file` and `caption` / `prompt` / `text`), a JSON manifest (a
list of such objects, or `{"clips": [...]}`) or JSON Lines. Relative paths in a manifest are
resolved against `root`, else the manifest's folder.

Bad input never stops a run: a manifest row pointing nowhere or a video without caption is left
out at discovery (returned in `problems`); a video that cannot be decoded or is shorter than
`num_frames` is skipped when read, with a warning, and the next clip is taken in its place (the
skipped paths are returned with the item so the trainer can count them).

`FeatureCache` stores, per clip, the VAE latent distribution, the prompt embedding and the teacher
tokens under a fingerprint of (file content, caption, models, resolution, frames, teacher), so a
cache entry made with other settings or an edited video is never read.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from gendistill.core.io import atomic_path
from gendistill.core.media import read_video

__all__ = [
    "VIDEO_EXTENSIONS",
    "Clip",
    "discover_clips",
    "sample_frame_indices",
    "resize_crop",
    "load_clip",
    "VideoClipDataset",
    "ResumableBatchSampler",
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
SAMPLING_MODES = ("uniform", "first", "stride")


@dataclass(frozen=True)
class Clip:
    """One training clip: a video file and its caption."""

    video: Path
    caption: str


# -- discovery ----------------------------------------------------------------------------------------
def _pick_column(keys: Sequence[str], wanted: Sequence[str], what: str, source: Path) -> str:
    lower = {k.lower().strip(): k for k in keys}
    for name in wanted:
        if name in lower:
            return lower[name]
    raise ValueError(f"{source}: no {what} column; expected one of {', '.join(wanted)}, found {', '.join(keys)}")


def _manifest_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            data = data.get("clips", data.get("data"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: a JSON manifest must be a list of {{video, caption}} objects or {{\"clips\": [...]}}")
        return data
    raise ValueError(f"{path}: unknown manifest type {suffix!r}; use a folder, .csv, .json or .jsonl")


def discover_clips(source: str | os.PathLike, root: str | os.PathLike | None = None) -> tuple[list[Clip], list[str]]:
    """Find the clips of a folder or manifest.

    Returns (clips sorted by path for folders / in manifest order, problems), where each problem is
    one line naming a row or file that was left out and why. Raises FileNotFoundError when `source`
    does not exist and ValueError when it holds no usable clip.
    """
    source = Path(source).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"training data {source} does not exist (give a folder of videos with .txt "
                                "captions, or a .csv / .json / .jsonl manifest)")
    clips, problems = [], []
    if source.is_dir():
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
        base = Path(root).expanduser() if root else source.parent
        rows = _manifest_rows(source)
        if rows:
            keys = list(rows[0].keys())
            vcol = _pick_column(keys, _VIDEO_COLUMNS, "video", source)
            ccol = _pick_column(keys, _CAPTION_COLUMNS, "caption", source)
        for i, row in enumerate(rows, start=1):
            if not isinstance(row, dict):
                problems.append(f"{source} row {i}: not an object")
                continue
            video, caption = str(row.get(vcol) or "").strip(), str(row.get(ccol) or "").strip()
            path = Path(video).expanduser()
            path = path if path.is_absolute() else base / path
            if not video:
                problems.append(f"{source} row {i}: empty video path")
            elif not path.is_file():
                problems.append(f"{source} row {i}: video {path} does not exist")
            elif not caption:
                problems.append(f"{source} row {i}: empty caption for {path}")
            else:
                clips.append(Clip(path, caption))
    for problem in problems:
        logger.warning("skipping %s", problem)
    if not clips:
        detail = f" ({len(problems)} entries left out, first: {problems[0]})" if problems else ""
        raise ValueError(f"no usable clips in {source}{detail}")
    return clips, problems


# -- decoding -----------------------------------------------------------------------------------------
def sample_frame_indices(num_available: int, num_frames: int, mode: str = "uniform") -> list[int]:
    """Indices of `num_frames` frames out of `num_available`.

    "uniform": spread evenly over the whole clip (first and last frame included); "first": the
    first `num_frames`; "stride" (VideoREPA as released, `finetune/datasets/utils.py`,
    `preprocess_video_with_resize_with_frame_idxs`): every (num_available // num_frames)-th frame from
    frame 0, and a shorter clip padded with its last frame. Raises ValueError when the clip is
    shorter than `num_frames` ("uniform", "first") or empty.
    """
    if mode not in SAMPLING_MODES:
        raise ValueError(f"frame sampling must be one of {SAMPLING_MODES}, got {mode!r}")
    if mode == "stride" and num_available > 0:
        if num_available < num_frames:
            return list(range(num_available)) + [num_available - 1] * (num_frames - num_available)
        return list(range(0, num_available, num_available // num_frames))[:num_frames]
    if num_available < num_frames:
        raise ValueError(f"has {num_available} frames, fewer than the {num_frames} needed")
    if mode == "first" or num_frames == 1:
        return list(range(num_frames))
    return np.linspace(0, num_available - 1, num_frames).round().astype(int).tolist()


def resize_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[F, 3, h, w] -> [F, 3, height, width]: scale so the frame covers the target (bilinear, antialiased), centre crop."""
    h, w = frames.shape[-2:]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        frames = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return frames[..., top : top + height, left : left + width].clamp(0.0, 1.0)


def load_clip(path: str | os.PathLike, num_frames: int, height: int, width: int, sampling: str = "uniform") -> torch.Tensor:
    """Decode a video and return [num_frames, 3, height, width] float32 in [0, 1].

    Raises ValueError naming the file when it cannot be decoded or is too short.
    """
    frames = read_video(path)
    try:
        idx = sample_frame_indices(len(frames), num_frames, sampling)
    except ValueError as err:
        raise ValueError(f"video {path} {err}") from None
    x = torch.from_numpy(np.ascontiguousarray(frames[idx])).permute(0, 3, 1, 2).float() / 255.0
    return resize_crop(x, height, width)


class VideoClipDataset(Dataset):
    """Clips -> {"video": [F, 3, H, W] in [0, 1], "caption", "index", "skipped": [paths]}.

    With `cache` and `keys` (one fingerprint per clip), items are read from the cache instead:
    {"latent_params", "prompt_embeds", optionally "teacher", "caption", "index", "skipped"}.
    A clip that fails to load is skipped (warning) and the next one taken, deterministically.
    """

    def __init__(self, clips: Sequence[Clip], *, num_frames: int, height: int, width: int,
                 sampling: str = "uniform", cache: "FeatureCache | None" = None, keys: Sequence[str] | None = None):
        if not clips:
            raise ValueError("VideoClipDataset needs at least one clip")
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"frame sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
        if cache is not None and (keys is None or len(keys) != len(clips)):
            raise ValueError("a cached dataset needs one key per clip")
        self.clips = list(clips)
        self.num_frames, self.height, self.width, self.sampling = num_frames, height, width, sampling
        self.cache, self.keys = cache, list(keys) if keys is not None else None

    def __len__(self) -> int:
        return len(self.clips)

    def _load(self, i: int) -> dict:
        clip = self.clips[i]
        if self.cache is not None:
            item = self.cache.load(self.keys[i])
            if item is None:
                raise ValueError(f"cache entry for {clip.video} is missing")
            return item
        return {"video": load_clip(clip.video, self.num_frames, self.height, self.width, self.sampling)}

    def __getitem__(self, index: int) -> dict:
        skipped = []
        for k in range(len(self.clips)):
            i = (index + k) % len(self.clips)
            try:
                item = self._load(i)
            except Exception as err:  # any decoding problem: skip this clip, never stop the run
                logger.warning("skipping clip %s: %s", self.clips[i].video, err)
                skipped.append(str(self.clips[i].video))
                continue
            item.update(caption=self.clips[i].caption, index=i, skipped=skipped)
            return item
        raise RuntimeError(f"none of the {len(self.clips)} clips could be read (first failure: {skipped[0]})")


def collate_clips(items: list[dict]) -> dict:
    """Stack tensors, keep captions / indices as lists, concatenate the skipped paths."""
    out = {"caption": [it["caption"] for it in items], "index": [it["index"] for it in items],
           "skipped": [p for it in items for p in it["skipped"]]}
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


# -- cache --------------------------------------------------------------------------------------------
def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's content (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_digests(paths: Sequence[str | os.PathLike], index: str | os.PathLike | None = None) -> list[str]:
    """`file_digest` of each path, reusing the digests recorded in `index` when size and mtime still match.

    `index` is a JSON file {absolute path: [size, mtime_ns, sha256]}; it is rewritten (atomically) when
    an entry was added or changed. Starting a run again over the same clips then costs a stat per
    file instead of reading every video. A file whose content changed in place, keeping its size and
    its mtime to the nanosecond, is not noticed.
    """
    index = Path(index) if index is not None else None
    known: dict = {}
    if index is not None and index.is_file():
        try:
            known = json.loads(index.read_text())
        except (OSError, ValueError) as err:  # unreadable: rebuilt from the files
            logger.warning("ignoring the file digest index %s: %s", index, err)
    out, changed = [], False
    for p in paths:
        key = os.path.abspath(p)
        st = os.stat(key)
        entry = known.get(key)
        if not (isinstance(entry, list) and entry[:2] == [st.st_size, st.st_mtime_ns]):
            entry = known[key] = [st.st_size, st.st_mtime_ns, file_digest(key)]
            changed = True
        out.append(entry[2])
    if changed and index is not None:
        with atomic_path(index) as tmp:
            tmp.write_text(json.dumps(known))
    return out


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
