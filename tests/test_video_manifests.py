"""Training data sources beyond folders and CSV/JSON: Parquet manifests, Hugging Face `datasets` folders (a path
or a bytes column) and WebDataset shards (split across processes and DataLoader workers, bad samples skipped
and counted, a resume going on at the exact batch); the same clips read from each give the same captions and bit-identical frames."""

import hashlib
import logging
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import gendistill.video_distill.data as data
from gendistill.core.media import write_video
from gendistill.video_distill.data import (
    DatasetVideo,
    ShardStreamPosition,
    VideoClipDataset,
    WebDatasetClips,
    collate_clips,
    decode_frames,
    discover_clips,
    expand_shards,
    file_digest,
    file_digests,
    is_shard_source,
    probe_video,
)

SIZE = dict(num_frames=5, height=24, width=32)
CAPTIONS = ["a red square drifts", "a blue gradient scrolls", "stripes move left", "a slow fade"]


def gradient(frames, height, width, shade):
    t = np.arange(frames)[:, None, None, None]
    y, x = np.mgrid[:height, :width]
    return ((x[None, :, :, None] * 3 + y[None, :, :, None] + t * 9 + shade * 40 + np.arange(3) * 60) % 256)


def shard_sample(key, video: Path, caption, as_json=False):
    sample = {"__key__": key, video.suffix[1:]: video.read_bytes()}
    sample["json" if as_json else "txt"] = {"caption": caption, "fps": 30} if as_json else caption
    return sample


def write_shard(path, samples):
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Four clips of 12 frames (the last an mkv: no frame count in its header) under videos/."""
    import imageio_ffmpeg

    folder = tmp_path_factory.mktemp("sources") / "videos"
    folder.mkdir()
    paths = []
    for k in range(4):
        path = folder / f"clip{k}.mp4"
        write_video(path, gradient(12, 32, 48, k).astype(np.uint8), fps=30)
        paths.append(path)
    mkv = folder / "clip3.mkv"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(paths[3]), "-c", "copy",
                    str(mkv)], check=True)
    paths[3].unlink()
    paths[3] = mkv
    return paths


def save_hf(folder, videos, captions, caption_column="prompt"):
    import datasets

    datasets.Dataset.from_dict({"video": videos, caption_column: captions}).save_to_disk(str(folder))
    return folder


def test_every_source_yields_the_same_captions_and_bit_identical_frames(clips, decoded_frames):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = clips[0].parent.parent
    (root / "m.csv").write_text("video,caption\n" + "".join(f"videos/{p.name},{c}\n" for p, c in zip(clips, CAPTIONS)))
    pq.write_table(pa.table({"path": [f"videos/{p.name}" for p in clips], "text": CAPTIONS}), root / "m.parquet")
    # a path column: absolute, and relative to the dataset folder
    paths = [str(clips[0]), str(clips[1]), f"../videos/{clips[2].name}", f"../videos/{clips[3].name}"]
    save_hf(root / "hf_paths", paths, CAPTIONS)
    save_hf(root / "hf_bytes", [p.read_bytes() for p in clips], CAPTIONS)
    write_shard(root / "shard-000000.tar", [shard_sample("s0", clips[0], CAPTIONS[0]),
                                            shard_sample("s1", clips[1], CAPTIONS[1], as_json=True)])
    write_shard(root / "shard-000001.tar", [shard_sample("s2", clips[2], CAPTIONS[2]),
                                            shard_sample("s3", clips[3], CAPTIONS[3], as_json=True)])

    def listed(source):
        found, problems = discover_clips(source)
        assert problems == [] and [c.caption for c in found] == CAPTIONS
        ds = VideoClipDataset(found, **SIZE)
        return [(it["caption"], it["video"]) for it in (ds[i] for i in range(len(ds)))]

    reference = listed(root / "m.csv")
    assert [v.shape for _, v in reference] == [(5, 3, 24, 32)] * 4
    by_bytes = discover_clips(root / "hf_bytes")[0]
    assert all(isinstance(c.video, DatasetVideo) for c in by_bytes)
    assert str(by_bytes[2].video) == f"{root / 'hf_bytes'}[2].video"
    assert is_shard_source(root / "shard-{000000..000001}.tar") and not is_shard_source(root / "videos")
    shards = WebDatasetClips(str(root / "shard-{000000..000001}.tar"), shuffle=False, **SIZE)
    streamed = [(it["caption"], it["video"]) for it in shards]
    assert [it["key"].rsplit(":", 1)[1] for it in shards] == ["s0", "s1", "s2", "s3"]
    for source in (listed(root / "m.parquet"), listed(root / "hf_paths"), listed(root / "hf_bytes"), streamed):
        assert [c for c, _ in source] == CAPTIONS
        assert all(torch.equal(v, ref) for (_, v), (_, ref) in zip(source, reference))

    # bytes go through the same streaming decoder as files: the same frames decoded, and only those needed
    decoded = decoded_frames
    counts = []
    for source in (clips[3], clips[3].read_bytes(), by_bytes[3].video):
        decoded.clear()
        frames = decode_frames(source, [1, 4])
        counts.append(len(decoded))
        assert probe_video(source) == probe_video(clips[3]) and frames.shape == (2, 32, 48, 3)
    assert counts[0] == counts[1] == counts[2] < 12
    # the cache's file digests: a DatasetVideo's is its bytes', kept in the digest index
    index = root / "digests.json"
    assert file_digests([by_bytes[0].video], index) == [file_digest(clips[0])]
    assert file_digest(by_bytes[0].video) == hashlib.sha256(clips[0].read_bytes()).hexdigest()
    assert f"{root / 'hf_bytes'}[0].video" in index.read_text()


def test_a_datasets_video_column_is_read_raw_without_the_datasets_decoder(clips, tmp_path, monkeypatch):
    """A column of the `datasets.Video` feature type: cells {"bytes", "path"}, which datasets itself decodes
    with torchcodec (blocked here). Each cell's bytes (datasets 5's save_to_disk stores a file given by path in
    the arrow file; a version that keeps the path has the file read) decode with our streaming decoder to the
    frames of the file; bytes win over a path name; an empty cell is named and left out."""
    import json
    import sys

    datasets = pytest.importorskip("datasets")
    if not hasattr(datasets, "Video"):
        pytest.skip(f"datasets {datasets.__version__} has no Video feature")
    monkeypatch.setitem(sys.modules, "torchcodec", None)  # any import of it fails
    folder = tmp_path / "hf_video"
    cells = [str(clips[0]), str(clips[1]), {"bytes": clips[2].read_bytes(), "path": None},
             {"bytes": clips[3].read_bytes(), "path": "elsewhere.mkv"}, None]
    features = datasets.Features({"video": datasets.Video(), "caption": datasets.Value("string")})
    datasets.Dataset.from_dict({"video": cells, "caption": CAPTIONS + ["a row without video"]},
                               features=features).save_to_disk(str(folder))
    saved = json.loads((folder / "dataset_info.json").read_text())["features"]
    assert saved["video"]["_type"] == "Video"  # the folder holds the feature type, not plain paths or bytes

    found, problems = discover_clips(folder)
    assert problems == [f"{folder}[4]: no video in column video"]
    assert [c.caption for c in found] == CAPTIONS and all(isinstance(c.video, DatasetVideo) for c in found)
    assert [c.video.read_bytes() for c in found] == [p.read_bytes() for p in clips]
    items = VideoClipDataset(found, **SIZE)
    reference = VideoClipDataset([data.Clip(p, c) for p, c in zip(clips, CAPTIONS)], **SIZE)
    for i in range(len(clips)):
        assert items[i]["skipped"] == [] and torch.equal(items[i]["video"], reference[i]["video"]), i
    assert probe_video(found[3].video) == probe_video(clips[3])


def test_shards_are_split_across_ranks_and_workers_once_each_by_seed_and_epoch(clips, tmp_path, monkeypatch):
    for s in range(4):
        samples = [shard_sample(f"{s}-{j}", clips[(s + j) % 4], f"shard {s} clip {j}") for j in range(2)]
        write_shard(tmp_path / f"train-{s:06d}.tar", samples)
    every = {f"{s}-{j}" for s in range(4) for j in range(2)}
    pattern = str(tmp_path / "train-{000000..000003}.tar")
    assert expand_shards(pattern) == expand_shards(tmp_path) and len(expand_shards(tmp_path)) == 4

    def keys(**kw):
        return [it["key"].rsplit(":", 1)[1] for it in WebDatasetClips(pattern, seed=3, **SIZE, **kw)]

    for epoch in (0, 1):
        ranks = [keys(rank=r, world=2, epoch=epoch) for r in range(2)]
        assert sorted(ranks[0] + ranks[1]) == sorted(every) and not set(ranks[0]) & set(ranks[1])
        assert keys(rank=0, world=2, epoch=epoch) == ranks[0]  # deterministic
        # two DataLoader workers per rank (webdataset reads WORKER / NUM_WORKERS like a worker's info)
        split = []
        for r in range(2):
            for w in range(2):
                with monkeypatch.context() as m:
                    m.setenv("WORKER", str(w))
                    m.setenv("NUM_WORKERS", "2")
                    split.append(keys(rank=r, world=2, epoch=epoch))
        assert sorted(sum(split, [])) == sorted(every) and all(len(part) == 2 for part in split)
    stream = WebDatasetClips(pattern, seed=3, **SIZE)
    assert stream.shards_for(0, 0, 2) != stream.shards_for(1, 0, 2)  # a new shard order each epoch
    # rank and world from the launcher's environment (accelerate launch / torchrun)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert keys() == keys(rank=1, world=2)
    # a real DataLoader with 2 workers reads this rank's samples once each
    loader = DataLoader(WebDatasetClips(pattern, seed=3, **SIZE), batch_size=2, num_workers=2, collate_fn=collate_clips)
    mine = {f"shard {s} clip {j}" for s in range(4) for j in range(2) if f"{s}-{j}" in keys()}
    got = [caption for batch in loader for caption in batch["caption"]]
    assert len(got) == 4 and set(got) == mine
    # endless epochs go on past the first
    endless = iter(WebDatasetClips(pattern, seed=3, epochs=None, rank=0, world=2, **SIZE))
    first = [next(endless)["key"].rsplit(":", 1)[1] for _ in range(9)]
    assert first == [*keys(rank=0, world=2), *keys(rank=0, world=2, epoch=1), keys(rank=0, world=2, epoch=2)[0]]
    with pytest.raises(ValueError, match="4 shards for 5 processes"):
        next(iter(WebDatasetClips(pattern, rank=0, world=5, **SIZE)))


def test_a_corrupt_sample_in_a_shard_is_skipped_counted_and_named(clips, tmp_path, caplog):
    good = [shard_sample(f"k{j}", clips[j], CAPTIONS[j]) for j in range(4)]
    bad_video = {"__key__": "broken", "mp4": b"\x00\x00\x00\x18ftypmp42 not really a video", "txt": "x"}
    no_caption = {"__key__": "silent", "mp4": clips[0].read_bytes()}
    write_shard(tmp_path / "a.tar", [good[0], bad_video, good[1], no_caption])
    # a shard cut short inside the video of its second sample: the member being read is named
    write_shard(tmp_path / "b.tar", [good[2], good[3]])
    with tarfile.open(tmp_path / "b.tar") as tar:
        cut = tar.getmember("k3.mkv").offset_data + 700
    (tmp_path / "b.tar").write_bytes((tmp_path / "b.tar").read_bytes()[:cut])
    # and a shard that is no tar file (read first: shards go by name)
    (tmp_path / "0-bad.tar").write_bytes(b"\x17" * 3000)
    stream = WebDatasetClips(tmp_path, shuffle=False, **SIZE)
    with caplog.at_level(logging.WARNING, logger="gendistill.video_distill"):
        batches = list(DataLoader(stream, batch_size=1, collate_fn=collate_clips))
    assert [b["caption"][0] for b in batches] == [CAPTIONS[0], CAPTIONS[1], CAPTIONS[2]]
    a, b, c = (str(tmp_path / name) for name in ("a.tar", "b.tar", "0-bad.tar"))
    bad = [c, f"{a}:broken.mp4", f"{a}:silent.mp4", f"{b}:k3.mkv"]
    # each goes with the next item out (k2 leaves after b.tar's next member failed)
    assert [batch["skipped"] for batch in batches] == [[bad[0]], [bad[1]], bad[2:]]
    skipped = set()  # as the trainer counts them: training_step's skipped.update(batch["skipped"])
    for batch in batches:
        skipped.update(batch["skipped"])
    assert len(skipped) == 4
    warnings = [r.getMessage() for r in caplog.records]
    for name, why in zip(bad, ("invalid header", "cannot read video", "no caption", "unexpected end of data")):
        assert sum(w.startswith(f"skipping {name}: ") for w in warnings) == 1
        assert any(w.startswith(f"skipping {name}: ") and why in w for w in warnings), (name, warnings)


def test_a_bad_manifest_gives_one_error_naming_the_file_and_the_column_or_row(clips, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    video = str(clips[0])
    (tmp_path / "nocap.csv").write_text(f"video,label\n{video},x\n")
    pq.write_table(pa.table({"video": [video], "label": ["x"]}), tmp_path / "nocap.parquet")
    save_hf(tmp_path / "hf_nocap", [video], ["x"], caption_column="label")
    for source in (tmp_path / "nocap.csv", tmp_path / "nocap.parquet", tmp_path / "hf_nocap"):
        with pytest.raises(ValueError, match=rf"^{source}: no caption column; expected one of caption, .*, "
                                             "found video, label"):
            discover_clips(source)

    (tmp_path / "missing.csv").write_text(f"video,caption\n{video},ok\nnowhere.mp4,lost\n")
    pq.write_table(pa.table({"video": [video, "nowhere.mp4"], "caption": ["ok", "lost"]}), tmp_path / "missing.parquet")
    save_hf(tmp_path / "hf_missing", [video, "nowhere.mp4"], ["ok", "lost"])
    for source, row, base in ((tmp_path / "missing.csv", " row 2", tmp_path),
                              (tmp_path / "missing.parquet", " row 2", tmp_path),
                              (tmp_path / "hf_missing", "[1]", tmp_path / "hf_missing")):  # relative to the folder
        found, problems = discover_clips(source)
        assert len(found) == 1 and problems == [f"{source}{row}: video {base / 'nowhere.mp4'} does not exist"]
    (tmp_path / "only_missing.csv").write_text("video,caption\nnowhere.mp4,lost\n")
    with pytest.raises(ValueError, match=r"no usable clips in .*only_missing.csv \(1 entries left out, first: "
                                         r".*only_missing.csv row 1: video .*nowhere.mp4 does not exist"):
        discover_clips(tmp_path / "only_missing.csv")
    pq.write_table(pa.table({"video": [b"\x00"], "caption": ["x"]}), tmp_path / "bytes.parquet")
    with pytest.raises(ValueError, match="bytes.parquet: column video holds video bytes"):
        discover_clips(tmp_path / "bytes.parquet")
    with pytest.raises(ValueError, match="WebDataset shards.*WebDatasetClips"):
        discover_clips(tmp_path / "train-{000..002}.tar")
    write_shard(tmp_path / "train-000.tar", [shard_sample("k", clips[0], "x")])
    with pytest.raises(FileNotFoundError, match=r"2 of 3 shards do not exist \(first: .*train-001.tar\)"):
        WebDatasetClips(str(tmp_path / "train-{000..002}.tar"), **SIZE)


def test_the_trainer_reads_a_bytes_dataset_and_counts_its_undecodable_cell(clips, tmp_path):
    """Through the feature cache too (digests of cells, not files); the bad cell reaches the step record."""
    import json

    from gendistill.config import load_config
    from gendistill.testing.video import write_tiny_models
    from gendistill.video_distill.finetune_config import FinetuneConfig
    from gendistill.video_distill.trainer import VideoREPATrainer

    models = write_tiny_models(tmp_path / "models")
    folder = save_hf(tmp_path / "hf", [p.read_bytes() for p in clips[:3]] + [b"not a video"], CAPTIONS)
    tiny = Path(__file__).resolve().parents[1] / "configs" / "video_distill" / "tiny_cpu.yaml"
    cfg = load_config(FinetuneConfig, tiny, [
        f"output_dir={tmp_path / 'run'}", f"model.pretrained={models['cogvideox']}",
        f"teacher.path={models['videomae']}", f"data.path={folder}", "data.cache=true", "max_steps=2", "log_every=1",
        "validation.every=0", "export=false", "checkpoint.every=0"])
    trainer = VideoREPATrainer(cfg)
    trainer.train()
    assert len(trainer.dataset) == 3 and trainer.skipped == {f"{folder}[3].video"}
    records = [json.loads(line) for line in (tmp_path / "run" / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records if "step" in r][-1] == 1
    digests = json.loads((tmp_path / "run" / "cache" / "file_digests.json").read_text())
    assert digests.keys() == {f"{folder}[{i}].video" for i in range(4)}


def test_the_trainer_streams_shards_and_counts_a_corrupt_member(clips, tmp_path):
    """`data.path` a shard pattern: the trainer streams it (no listing), a bad member reaches the step
    record's skipped count; buckets and the feature cache are refused for shards before models load."""
    import json

    from gendistill.config import load_config
    from gendistill.testing.video import write_tiny_models
    from gendistill.video_distill.finetune_config import FinetuneConfig
    from gendistill.video_distill.trainer import VideoREPATrainer

    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards" / "train-000.tar", [shard_sample("a", clips[0], CAPTIONS[0]),
                                                        shard_sample("b", bad, CAPTIONS[1])])
    write_shard(tmp_path / "shards" / "train-001.tar", [shard_sample("c", clips[2], CAPTIONS[2])])
    models = write_tiny_models(tmp_path / "models")
    tiny = Path(__file__).resolve().parents[1] / "configs" / "video_distill" / "tiny_cpu.yaml"
    base = [f"output_dir={tmp_path / 'run'}", f"model.pretrained={models['cogvideox']}",
            f"teacher.path={models['videomae']}", f"data.path={tmp_path / 'shards' / 'train-{000..001}.tar'}",
            "max_steps=3", "log_every=1", "validation.every=0", "export=false", "checkpoint.every=0"]
    trainer = VideoREPATrainer(load_config(FinetuneConfig, tiny, base))
    summary = trainer.train()
    assert summary["step"] == 3 and "train-000.tar:b" in " ".join(trainer.skipped)
    records = [json.loads(line) for line in (tmp_path / "run" / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records if "step" in r][-1] >= 1
    for key, value in (("data.cache", "true"), ("data.buckets", "[[9,32,32]]")):
        with pytest.raises(ValueError, match=f"{key}: not available with WebDataset shards"):
            VideoREPATrainer(load_config(FinetuneConfig, tiny, base + [f"{key}={value}"]))


BROKEN = b"\x00\x00\x00\x18ftypmp42 not really a video"


def keyed_shards(folder, clips, shards, per_shard, broken=True):
    """Shards train-<s>.tar of `per_shard` clips keyed "<s>-<j>"; with `broken`, an undecodable video
    "<s>-broken" among them, at position s % (per_shard + 1) (first, between, last)."""
    for s in range(shards):
        samples = [shard_sample(f"{s}-{j}", clips[(s + j) % 4], f"shard {s} clip {j}") for j in range(per_shard)]
        if broken:
            samples.insert(s % (per_shard + 1), {"__key__": f"{s}-broken", "mp4": BROKEN, "txt": "x"})
        write_shard(folder / f"train-{s}.tar", samples)
    return str(folder / f"train-{{0..{shards - 1}}}.tar")


def stream_batches(pattern, n, num_workers, **kw):
    """The stream and its first n batches from a DataLoader: [(sample keys, skipped members, indices)], cursors."""
    stream = WebDatasetClips(pattern, seed=3, epochs=None, **SIZE, **kw)
    got = []
    for batch in DataLoader(stream, batch_size=2, num_workers=num_workers, collate_fn=collate_clips):
        got.append(batch)
        if len(got) == n:
            break
    return stream, [([k.rsplit(":", 1)[1] for k in b["key"]], b["skipped"], b["index"]) for b in got], \
        [b["cursor"] for b in got]


def position_after(stream, readers, cursors, state=None):
    position = ShardStreamPosition(stream, readers, state)
    for cursor in cursors:
        position.consumed(cursor)
    return position.state()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_shard_stream_resumes_at_any_batch_exactly_without_decoding_what_it_passes(clips, tmp_path, monkeypatch,
                                                                                    num_workers):
    """After the batches up to k (their cursors kept by `ShardStreamPosition`), a stream given that state reads
    the uninterrupted stream's batches k+1.. (sample keys, skipped members, indices), with 0 or 2 DataLoader
    workers, across epochs, on each of 2 processes, and again from a resumed stream; the corrupt member of each
    shard shifts nothing, before the cursor or after it, and nothing before a cursor is decoded."""
    pattern = keyed_shards(tmp_path, clips, shards=5, per_shard=3)
    decoded = tmp_path / "decoded.txt"  # load_clip's calls, from DataLoader workers too (forked)
    real = data.load_clip

    def load_clip(*args, name=None, **kw):
        with open(decoded, "a") as f:
            f.write(f"{name}\n")
        return real(*args, name=name, **kw)

    monkeypatch.setattr(data, "load_clip", load_clip)
    readers = max(1, num_workers)
    for rank in range(2):
        stream, full, cursors = stream_batches(pattern, 9, num_workers, rank=rank, world=2)
        assert len({c["epoch"] for c in cursors}) > 1 and {c["reader"] for c in cursors} == set(range(readers))
        assert any(skipped for _, skipped, _ in full)  # broken members are met
        for k in (1, 2, 5):
            state = position_after(stream, readers, cursors[:k])
            decoded.write_text("")
            again, resumed, more = stream_batches(pattern, 9 - k, num_workers, rank=rank, world=2, state=state)
            assert resumed == full[k:], (rank, k)
            if num_workers == 0:  # no read-ahead: exactly the items handed out and the broken ones met on the way
                def key(member):  # url:key.ext -> key
                    return member.rsplit(":", 1)[1].rsplit(".", 1)[0]

                handed = [name for keys, skipped, _ in resumed for name in keys + [key(m) for m in skipped]]
                assert sorted(key(n) for n in decoded.read_text().split()) == sorted(handed), (rank, k)
            if k == 2:  # resumed twice: from the resumed stream's own position
                state = position_after(again, readers, more[:3], state)
                _, twice, _ = stream_batches(pattern, 9 - k - 3, num_workers, rank=rank, world=2, state=state)
                assert twice == full[k + 3:], rank


def test_a_shard_cut_short_before_the_cursor_is_not_reported_again(clips, tmp_path):
    """The error of a tar cut short, met while passing over the samples before the cursor, went out with the
    batches before it: the resumed batches name only what the uninterrupted ones name."""
    write_shard(tmp_path / "a.tar", [shard_sample("x0", clips[0], CAPTIONS[0])])
    write_shard(tmp_path / "b.tar", [shard_sample("x1", clips[1], CAPTIONS[1]), shard_sample("x2", clips[3], "cut")])
    with tarfile.open(tmp_path / "b.tar") as tar:
        cut = tar.getmember("x2.mkv").offset_data + 700
    (tmp_path / "b.tar").write_bytes((tmp_path / "b.tar").read_bytes()[:cut])
    write_shard(tmp_path / "c.tar", [shard_sample(f"x{j}", clips[j % 4], CAPTIONS[j % 4]) for j in (3, 4)])
    pattern = str(tmp_path / "{a,b,c}.tar")
    stream, full, cursors = stream_batches(pattern, 4, 0, shuffle=False)
    assert [keys for keys, _, _ in full] == [["x0", "x1"], ["x3", "x4"]] * 2
    assert full[0][1] == [f"{tmp_path / 'b.tar'}:x2.mkv"] and full[1][1] == []
    assert cursors[0]["sample"] == 1  # after x1, before the cut
    _, resumed, _ = stream_batches(pattern, 3, 0, shuffle=False, state=position_after(stream, 1, cursors[:1]))
    assert resumed == full[1:]


def test_a_shard_position_of_another_worker_count_or_stream_starts_afresh_with_a_warning(clips, tmp_path, caplog):
    pattern = keyed_shards(tmp_path, clips, shards=3, per_shard=2, broken=False)
    stream, _, cursors = stream_batches(pattern, 3, 2)
    state = position_after(stream, 2, cursors)
    _, fresh, _ = stream_batches(pattern, 3, 0)
    with caplog.at_level(logging.WARNING, logger="gendistill.video_distill"):
        _, resumed, _ = stream_batches(pattern, 3, 0, state=state)
    assert resumed == fresh
    assert any("saved with 2 DataLoader reader(s), this run has 1" in r.getMessage() and "starts afresh at epoch 0"
               in r.getMessage() for r in caplog.records)
    other = WebDatasetClips(pattern, seed=4, **SIZE)
    assert "seed changed" in other.state_problem(state, 2)
    assert "process 0 of 1, this is process 1 of 2" in WebDatasetClips(pattern, rank=1, world=2, seed=3,
                                                                       **SIZE).state_problem(state, 2)
    assert stream.state_problem(state, 2) is None and "no shard stream position" in stream.state_problem(None, 2)


def test_the_trainer_resumes_a_shard_stream_exactly_and_starts_afresh_when_the_workers_change(clips, tmp_path,
                                                                                               caplog):
    """With 2 DataLoader workers, the step-3 checkpoint holds both workers' cursors and the next one's turn; a
    run resumed from it reads the uninterrupted run's batches 4..; resumed with other data.num_workers it warns
    and reads a fresh epoch."""
    from gendistill.config import load_config
    from gendistill.testing.video import write_tiny_models
    from gendistill.video_distill.finetune_config import FinetuneConfig
    from gendistill.video_distill.trainer import VideoREPATrainer

    (tmp_path / "shards").mkdir()
    pattern = keyed_shards(tmp_path / "shards", clips, shards=3, per_shard=2)
    models = write_tiny_models(tmp_path / "models")
    tiny = Path(__file__).resolve().parents[1] / "configs" / "video_distill" / "tiny_cpu.yaml"

    def run(out, *extra):
        cfg = load_config(FinetuneConfig, tiny, [
            f"output_dir={out}", f"model.pretrained={models['cogvideox']}", f"teacher.path={models['videomae']}",
            f"data.path={pattern}", "max_steps=5", "log_every=1", "validation.every=0", "export=false",
            "checkpoint.every=3", "data.num_workers=2", *extra])
        trainer = VideoREPATrainer(cfg)
        seen, step = [], trainer.training_step
        trainer.training_step = lambda batch: seen.append(
            ([k.rsplit(":", 1)[1] for k in batch["key"]], batch["skipped"])) or step(batch)
        trainer.train()
        return trainer, seen

    full, seen_full = run(tmp_path / "a")
    checkpoint = tmp_path / "a" / "checkpoints" / "checkpoint-3"
    state = torch.load(checkpoint / "trainer_state_0.pt", weights_only=False)["data_state"]
    assert state["kind"] == "shards" and state["readers"] == 2 and state["next"] == 1
    assert [c["count"] for c in state["cursors"]] == [2, 1]  # batch size 1: workers 0, 1, 0
    resumed, seen_resumed = run(tmp_path / "b", f"resume_from_checkpoint={checkpoint}")
    assert resumed.position == 5 and seen_resumed == seen_full[3:]
    with caplog.at_level(logging.WARNING, logger="gendistill.video_distill"):
        _, seen_other = run(tmp_path / "c", f"resume_from_checkpoint={checkpoint}", "data.num_workers=0",
                            "max_steps=4")
    assert len(seen_other) == 1
    assert any("saved with 2 DataLoader reader(s), this run has 1" in r.getMessage() and
               "fresh epoch of shards (epoch 3)" in r.getMessage() for r in caplog.records)
