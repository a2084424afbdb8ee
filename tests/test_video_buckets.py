"""Buckets of (frames, height, width): clip assignment, one shape per batch, resume within each bucket
(sampler and trainer checkpoint), the data.fps / data.buckets config checks."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from gendistill.core.media import write_video
from gendistill.video_distill.data import (
    BucketBatchSampler,
    Clip,
    VideoClipDataset,
    VideoInfo,
    assign_bucket,
    bucket_clips,
    collate_clips,
)

BUCKETS = [(9, 32, 32), (5, 32, 48), (9, 32, 48), (17, 32, 48)]
TINY = Path(__file__).resolve().parents[1] / "configs" / "video_distill" / "tiny_cpu.yaml"


def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def write_clip(path, frames, height, width, shade=0):
    """A moving gradient, `frames` x height x width, 30 fps (H.264), with a caption beside it."""
    t = np.arange(frames)[:, None, None, None]
    y, x = np.mgrid[:height, :width]
    video = ((x[None, :, :, None] * 3 + y[None, :, :, None] + t * 9 + shade * 40 + np.arange(3) * 60) % 256)
    write_video(path, video.astype(np.uint8), fps=30)
    path.with_suffix(".txt").write_text(f"clip {path.stem}\n")
    return Clip(path, f"clip {path.stem}")


def test_a_clip_goes_to_the_nearest_aspect_ratio_then_length():
    assert assign_bucket(VideoInfo(40, 30.0, 64, 96), BUCKETS) == 3  # 3:2 and long enough for 17
    assert assign_bucket(VideoInfo(12, 30.0, 64, 96), BUCKETS) == 2  # 3:2, 12 frames: 9 is the longest that fits
    assert assign_bucket(VideoInfo(6, 30.0, 64, 96), BUCKETS) == 1
    assert assign_bucket(VideoInfo(40, 30.0, 64, 64), BUCKETS) == 0  # square
    assert assign_bucket(VideoInfo(40, 30.0, 100, 90), BUCKETS) == 0  # nearly square: the nearest aspect ratio
    assert assign_bucket(VideoInfo(6, 30.0, 64, 64), BUCKETS) == 1  # too short for the square one: nearest that fits
    assert assign_bucket(VideoInfo(4, 30.0, 64, 64), BUCKETS) is None
    # data.fps: 40 frames at 30 fps give 14 frames at 10 fps, too few for 17
    assert assign_bucket(VideoInfo(40, 30.0, 64, 96), BUCKETS, "fps", fps=10) == 2


def test_a_clip_shorter_than_every_bucket_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    clips = [write_clip(tmp_path / "long.mp4", 10, 32, 48), write_clip(tmp_path / "tiny_one.mp4", 3, 32, 32)]
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    clips.append(Clip(tmp_path / "broken.mp4", "b"))
    with caplog.at_level(logging.WARNING, logger="gendistill.video_distill"):
        of, left_out = bucket_clips(clips, BUCKETS)
    assert of == [2, None, None] and left_out == [str(tmp_path / "tiny_one.mp4"), str(tmp_path / "broken.mp4")]
    assert "tiny_one.mp4: 3 frames, shorter than every bucket in data.buckets (fewest: 5)" in caplog.text
    assert "broken.mp4" in caplog.text
    with pytest.raises(ValueError, match="none of the 1 clips fits a bucket of data.buckets"):
        bucket_clips(clips[1:2], BUCKETS)


def test_the_header_index_spares_a_restart_probing_every_clip(tmp_path, monkeypatch):
    """bucket_clips with an index: the first run reads every header and records it; the next reads none
    (probe_video made to fail), except a clip rewritten since; unreadable clips are not recorded."""
    from gendistill.video_distill import data

    clips = [write_clip(tmp_path / "a.mp4", 10, 32, 48), write_clip(tmp_path / "b.mp4", 12, 32, 32)]
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    clips.append(Clip(tmp_path / "broken.mp4", "b"))
    index = tmp_path / "cache" / "video_headers.json"
    first = bucket_clips(clips, BUCKETS, index=index)
    assert first == ([2, 0, None], [str(tmp_path / "broken.mp4")])
    recorded = json.loads(index.read_text())
    assert sorted(recorded) == [str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")]
    assert recorded[str(tmp_path / "a.mp4")][2][:4] == [10, 30.0, 32, 48]
    probed = []
    real = data.probe_video

    def counting(path):
        probed.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(data, "probe_video", counting)
    assert bucket_clips(clips, BUCKETS, index=index) == first
    assert probed == ["broken.mp4"]  # only the unreadable one is read again
    write_clip(tmp_path / "b.mp4", 4, 32, 32)  # rewritten: too short now
    probed.clear()
    assert bucket_clips(clips, BUCKETS, index=index) == ([2, None, None], [str(tmp_path / "b.mp4"),
                                                                           str(tmp_path / "broken.mp4")])
    assert probed == ["b.mp4", "broken.mp4"]
    assert data.probe_videos([tmp_path / "a.mp4"], index) == [real(tmp_path / "a.mp4")]


def test_batches_never_mix_shapes_and_each_epoch_reads_every_clip_once(tmp_path, caplog):
    specs = [(9, 32, 32), (9, 32, 32), (9, 32, 32), (9, 32, 32), (9, 32, 48), (9, 32, 48), (5, 32, 48), (5, 32, 48)]
    clips = [write_clip(tmp_path / f"c{i}.mp4", f + 2, h, w, shade=i) for i, (f, h, w) in enumerate(specs)]
    of, _ = bucket_clips(clips, BUCKETS)
    assert of == [0, 0, 0, 0, 2, 2, 1, 1]
    shapes = [BUCKETS[b] for b in of]
    ds = VideoClipDataset(clips, num_frames=9, height=32, width=32, shapes=shapes)
    sampler = BucketBatchSampler(of, 2, seed=5)
    assert len(sampler) == 4  # 2 + 1 + 1 batches
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_clips)
    seen = []
    for _, batch in zip(range(8), loader):  # two epochs
        buckets = {of[i] for i in batch["index"]}
        assert len(buckets) == 1
        (b,) = buckets
        assert tuple(batch["video"].shape) == (2, BUCKETS[b][0], 3, *BUCKETS[b][1:])
        seen.append(sorted(batch["index"]))
    assert sorted(sum(seen[:4], [])) == list(range(8)) and sorted(sum(seen[4:], [])) == list(range(8))
    assert seen[:4] != seen[4:]  # a new order each epoch

    # a clip that fails to load is replaced by one of the same shape, never by another bucket's
    (tmp_path / "c6.mp4").write_bytes(b"broken")
    with caplog.at_level(logging.WARNING, logger="gendistill.video_distill"):
        item = ds[6]
    assert item["index"] == 7 and item["video"].shape == (5, 3, 32, 48) and item["skipped"] == [str(clips[6].video)]


def test_resume_restores_the_position_within_each_bucket():
    of = [0] * 5 + [1] * 7 + [2] * 4 + [None] * 2  # 2, 3, 2 batches of 2 per epoch; two clips left out
    full = take(BucketBatchSampler(of, 2, seed=3), 25)
    bucket = [of[batch[0]] for batch in full]
    assert all({of[i] for i in batch} == {bucket[j]} for j, batch in enumerate(full))
    assert sorted(bucket[:7]) == [0, 0, 1, 1, 1, 2, 2] and bucket[:7] != bucket[7:14]
    for k in (0, 3, 7, 11, 20):
        state = BucketBatchSampler(of, 2, seed=3).state_at(k)
        assert [b["position"] for b in state["buckets"]] == [bucket[:k].count(b) for b in range(3)]
        state = json.loads(json.dumps(state))  # as stored in a checkpoint
        resumed = BucketBatchSampler(of, 2, seed=999, start=k, state=state)  # the checkpoint's seeds are used
        assert take(resumed, 25 - k) == full[k:], k
    # two processes: the same bucket at each step, different clips
    r0 = take(BucketBatchSampler(of, 2, num_replicas=2, rank=0, seed=3), 6)
    r1 = take(BucketBatchSampler(of, 2, num_replicas=2, rank=1, seed=3), 6)
    assert [of[b[0]] for b in r0] == [of[b[0]] for b in r1]
    assert all(not set(a) & set(b) for a, b in zip(r0, r1))


def test_a_saved_position_for_other_buckets_is_ignored_with_a_warning(caplog):
    of = [0] * 4 + [1] * 4
    state = BucketBatchSampler(of, 2, seed=1).state_at(3)
    with caplog.at_level(logging.WARNING, logger="gendistill.video_distill"):
        sampler = BucketBatchSampler(of + [1, 1], 2, seed=1, start=3, state=state)
    assert "does not fit this run's" in caplog.text
    assert sampler.state == sampler.state_at(3)
    with pytest.raises(ValueError, match="no bucket has a global batch"):
        BucketBatchSampler([0, 1], 2)


def test_config_names_the_bad_data_key():
    from gendistill.config import load_config
    from gendistill.video_distill.finetune_config import FinetuneConfig, check_config

    def check(*overrides):
        check_config(load_config(FinetuneConfig, TINY, list(overrides)))

    check("data.frame_sampling=fps", "data.fps=8", "data.buckets=[[9,32,32],[17,32,48]]")
    for overrides, message in [
        (("data.frame_sampling=fps",), "data.fps must be a frame rate > 0"),
        (("data.fps=8",), "data.fps=8.0 is set but data.frame_sampling is 'uniform'"),
        (("data.frame_sampling=spread",), "data.frame_sampling must be one of"),
        (("data.buckets=[[9,32,32],[8,32,48]]",), r"data.buckets\[1\]: frames must be 4k\+1"),
        (("data.buckets=[[9,32]]",), r"data.buckets\[0\] must be \[frames, height, width\]"),
        (("data.buckets=[[5,32,32]]",), r"data.buckets\[0\] has 5 frames; the teacher reads frames 1..8"),
    ]:
        with pytest.raises(ValueError, match=message):
            check(*overrides)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from gendistill.testing.video import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("tiny-models"))


def test_trainer_checkpoints_the_bucket_positions_and_resumes_them(tiny_models, tmp_path):
    """A run resumed from its step-2 checkpoint reads the same batches as the uninterrupted run."""
    from gendistill.config import load_config
    from gendistill.video_distill.finetune_config import FinetuneConfig
    from gendistill.video_distill.trainer import VideoREPATrainer

    data = tmp_path / "clips"
    data.mkdir()
    for i, (h, w) in enumerate([(64, 64), (64, 64), (64, 96), (64, 96), (64, 96)]):
        write_clip(data / f"c{i}.mp4", 12, h, w, shade=i)
    write_clip(data / "short.mp4", 3, 64, 64)

    def run(out, *extra):
        cfg = load_config(FinetuneConfig, TINY, [
            f"output_dir={out}", f"model.pretrained={tiny_models['cogvideox']}",
            f"teacher.path={tiny_models['videomae']}",
            f"data.path={data}", "data.buckets=[[9,32,32],[9,32,48]]", "max_steps=5", "checkpoint.every=2",
            "validation.every=0", "export=false", *extra])
        trainer = VideoREPATrainer(cfg)
        seen, step = [], trainer.training_step
        trainer.training_step = lambda batch: seen.append((batch["index"], tuple(batch["video"].shape))) or step(batch)
        trainer.train()
        return trainer, seen

    full, seen_full = run(tmp_path / "a")
    assert full.dataset.shapes.count((9, 32, 32)) == 2 and str(data / "short.mp4") in full.skipped
    assert {shape for _, shape in seen_full} == {(1, 9, 3, 32, 32), (1, 9, 3, 32, 48)}
    state = torch.load(tmp_path / "a" / "checkpoints" / "checkpoint-2" / "trainer_state_0.pt", weights_only=False)
    assert state["data_state"] == full.batch_sampler.state_at(2)
    checkpoint = tmp_path / "a" / "checkpoints" / "checkpoint-2"
    resumed, seen_resumed = run(tmp_path / "b", f"resume_from_checkpoint={checkpoint}")
    assert resumed.position == 5 and seen_resumed == seen_full[2:]
    # the headers read once are recorded beside the feature cache (the short clip's too: it is readable)
    headers = json.loads((tmp_path / "a" / "cache" / "video_headers.json").read_text())
    assert sorted(Path(k).name for k in headers) == sorted(p.name for p in data.glob("*.mp4"))
