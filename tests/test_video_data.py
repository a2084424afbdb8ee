"""Training clips (discovery, decoding, bad input, resumable batches, cache keys) and `gendistill generate`."""

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from gendistill.core.media import read_video, write_video
from gendistill.video_distill.data import (
    Clip,
    FeatureCache,
    ResumableBatchSampler,
    VideoClipDataset,
    VideoInfo,
    clip_fingerprint,
    decode_frames,
    file_digest,
    file_digests,
    discover_clips,
    frames_available,
    load_clip,
    probe_video,
    resize_crop,
    sample_frame_indices,
)

ROOT = Path(__file__).resolve().parents[1]
CLIPS = ROOT / "assets" / "clips"


def test_shipped_clips_have_captions_and_frames():
    clips, problems = discover_clips(CLIPS)
    assert len(clips) == 4 and problems == []
    assert all("ball" in c.caption and "bounces" in c.caption for c in clips)
    video = read_video(clips[0].video)
    assert video.shape == (25, 64, 64, 3)
    assert sum(p.stat().st_size for p in CLIPS.iterdir()) < 100_000


def test_folder_and_manifests_report_bad_entries(tmp_path):
    shutil.copy(CLIPS / "green_drop.mp4", tmp_path / "a.mp4")
    (tmp_path / "a.txt").write_text("a green ball\n")
    shutil.copy(CLIPS / "green_drop.mp4", tmp_path / "no_caption.mp4")
    clips, problems = discover_clips(tmp_path)
    assert [c.video.name for c in clips] == ["a.mp4"] and clips[0].caption == "a green ball"
    assert len(problems) == 1 and "no_caption.mp4" in problems[0] and "no caption" in problems[0]

    (tmp_path / "m.csv").write_text("path,prompt\na.mp4,first\nmissing.mp4,second\n")
    clips, problems = discover_clips(tmp_path / "m.csv")
    assert [(c.video, c.caption) for c in clips] == [(tmp_path / "a.mp4", "first")]
    assert "row 2" in problems[0] and "missing.mp4 does not exist" in problems[0]

    (tmp_path / "m.json").write_text(json.dumps([{"video": str(tmp_path / "a.mp4"), "caption": "x"}]))
    assert len(discover_clips(tmp_path / "m.json")[0]) == 1
    (tmp_path / "m.jsonl").write_text(json.dumps({"file": "a.mp4", "text": "y"}) + "\n")
    assert discover_clips(tmp_path / "m.jsonl")[0][0].caption == "y"

    (tmp_path / "bad.csv").write_text("video,caption\nmissing.mp4,x\n")
    with pytest.raises(ValueError, match="no usable clips.*missing.mp4"):
        discover_clips(tmp_path / "bad.csv")
    (tmp_path / "nocol.csv").write_text("clip,caption\na.mp4,x\n")
    with pytest.raises(ValueError, match="no video column"):
        discover_clips(tmp_path / "nocol.csv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover_clips(tmp_path / "nowhere")


def test_frame_sampling_and_resize_crop():
    assert sample_frame_indices(25, 9) == [0, 3, 6, 9, 12, 15, 18, 21, 24]
    assert sample_frame_indices(25, 4, "first") == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="has 5 frames, fewer than the 9 needed"):
        sample_frame_indices(5, 9)
    # VideoREPA's "stride": every (n // 49)-th frame from 0, first 49 kept; a short clip padded with its last
    assert sample_frame_indices(150, 49, "stride") == [3 * i for i in range(49)]
    assert sample_frame_indices(99, 49, "stride") == [2 * i for i in range(49)]  # 0..96, not spread to 98
    assert sample_frame_indices(30, 49, "stride") == list(range(30)) + [29] * 19
    # a 40 x 80 frame to 20 x 20: scaled to 20 x 40, centre columns 10..30 kept
    x = torch.arange(80.0).repeat(40, 1)[None, None].expand(1, 3, 40, 80) / 80
    out = resize_crop(x, 20, 20)
    assert out.shape == (1, 3, 20, 20)
    assert 0.24 < float(out[0, 0, 0, 0]) < 0.28 and 0.72 < float(out[0, 0, 0, -1]) < 0.76
    clip = load_clip(CLIPS / "red_throw_right.mp4", 9, 32, 48)
    assert clip.shape == (9, 3, 32, 48) and 0 <= float(clip.min()) and float(clip.max()) <= 1


@pytest.fixture(scope="module")
def gop_clips(tmp_path_factory):
    """150 frames of 96x64 at 30 fps, H.264 with B-frames and a keyframe every 10 frames: as mp4 (frame
    count in the header) and as mkv (none: counted from the packets)."""
    import imageio_ffmpeg

    folder = tmp_path_factory.mktemp("gop")
    ffmpeg = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error"]
    subprocess.run([*ffmpeg, "-f", "lavfi", "-i", "testsrc2=size=96x64:rate=30", "-t", "5", "-c:v", "libx264",
                    "-preset", "veryfast", "-g", "10", "-pix_fmt", "yuv420p", str(folder / "gop.mp4")], check=True)
    subprocess.run([*ffmpeg, "-i", str(folder / "gop.mp4"), "-c", "copy", str(folder / "gop.mkv")], check=True)
    return [folder / "gop.mp4", folder / "gop.mkv"]


def test_pyav_decodes_the_sampled_frames_as_imageio_does_and_no_more(gop_clips, decoded_frames):
    decoded = decoded_frames
    for path in gop_clips:
        ref = read_video(path)  # imageio (ffmpeg), the whole clip: the reference
        assert ref.shape == (150, 64, 96, 3) and probe_video(path) == VideoInfo(150, 30.0, 64, 96)
        for idx in (sample_frame_indices(150, 9), [0], [149], [77, 3, 77, 120], sample_frame_indices(150, 49, "stride"),
                    sample_frame_indices(150, 9, "fps", fps=6, source_fps=30)):
            assert np.array_equal(decode_frames(path, idx), ref[idx]), (path.name, idx)  # bit-exact, not a tolerance
        decoded.clear()
        decode_frames(path, [120, 125])  # from the keyframe at 120: 6 frames of 150
        assert 6 <= len(decoded) <= 8, len(decoded)
        decoded.clear()
        decode_frames(path, [5, 140])  # 0..10 (the keyframe interval learnt), then a seek to 140: 12 frames
        assert len(decoded) <= 14, len(decoded)
        # load_clip = the old path (the whole clip decoded, then sampled) to the last bit
        idx = sample_frame_indices(150, 9)
        old = resize_crop(torch.from_numpy(ref[idx]).permute(0, 3, 1, 2).float() / 255.0, 32, 48)
        assert torch.equal(load_clip(path, 9, 32, 48), old)
    with pytest.raises(ValueError, match="ends at frame 149, before frame 150"):
        decode_frames(gop_clips[0], [150])


def test_fps_sampling_picks_the_nearest_frames_at_the_target_rate(gop_clips):
    assert sample_frame_indices(150, 5, "fps", fps=10, source_fps=30) == [0, 3, 6, 9, 12]
    assert sample_frame_indices(150, 4, "fps", fps=8, source_fps=30000 / 1001) == [0, 4, 7, 11]  # k * 3.746
    assert sample_frame_indices(10, 5, "fps", fps=30, source_fps=24) == [0, 1, 2, 2, 3]  # a slower source repeats
    with pytest.raises(ValueError, match="has 12 frames, fewer than the 13 needed for 5 frames at 10 fps"):
        sample_frame_indices(12, 5, "fps", fps=10, source_fps=30)
    with pytest.raises(ValueError, match=r"data.fps"):
        sample_frame_indices(100, 5, "fps", source_fps=30)
    with pytest.raises(ValueError, match="no frame rate"):
        sample_frame_indices(100, 5, "fps", fps=8, source_fps=None)
    for n in (1, 2, 13, 49, 100):
        for src, fps in ((30, 8), (30000 / 1001, 8), (24, 30), (25, 25), (60, 7.5)):
            most = frames_available(n, "fps", fps=fps, source_fps=src)  # the most frames a clip gives at fps
            assert len(sample_frame_indices(n, most, "fps", fps=fps, source_fps=src)) == most
            with pytest.raises(ValueError, match="fewer than"):
                sample_frame_indices(n, most + 1, "fps", fps=fps, source_fps=src)
    ref = read_video(gop_clips[0])
    old = resize_crop(torch.from_numpy(ref[[0, 5, 10, 15, 20]]).permute(0, 3, 1, 2).float() / 255.0, 32, 32)
    assert torch.equal(load_clip(gop_clips[0], 5, 32, 32, "fps", fps=6), old)


# a variable-frame-rate clip: 6 frames at 10 fps, then 24 at 30 fps; frame i is flat gray 8 * (i + 1)
VFR_TIMES = [k / 10 for k in range(6)] + [0.6 + k / 30 for k in range(24)]


def write_vfr_clip(path: Path, times) -> Path:
    """H.264 (B-frames, a keyframe every 8 frames) with frame i at `times[i]` seconds, written with PyAV."""
    import av
    from fractions import Fraction

    tb = Fraction(1, 300)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        stream.time_base = stream.codec_context.time_base = tb
        stream.gop_size = 8
        stream.options = {"crf": "1", "bf": "2"}
        for i, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(np.full((32, 48, 3), 8 * (i + 1), np.uint8), format="rgb24")
            frame.pts, frame.time_base = round(t / tb), tb
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def gray_index(frames) -> list[int]:
    """The frame number each flat gray frame encodes (uint8 [F, H, W, 3], or float [F, 3, H, W] in [0, 1])."""
    x = frames.float().mul(255) if isinstance(frames, torch.Tensor) else frames.astype(np.float64)
    return [round(float(v) / 8) - 1 for v in x.reshape(len(x), -1).mean(1)]


@pytest.fixture(scope="module")
def vfr_clips(tmp_path_factory):
    """The clip as mp4 (a frame count and a full sample index in the header) and as mkv (neither; its
    timestamps rounded to milliseconds)."""
    folder = tmp_path_factory.mktemp("vfr")
    return [write_vfr_clip(folder / "vfr.mp4", VFR_TIMES), write_vfr_clip(folder / "vfr.mkv", VFR_TIMES)]


def test_variable_frame_rate_clips_sample_by_timestamp(vfr_clips, decoded_frames):
    decoded = decoded_frames
    times = np.array(VFR_TIMES)
    end = times[-1] + (times[-1] - times[-2]) / 2  # the last frame shows until half a frame after it
    for path in vfr_clips:
        info = probe_video(path)
        assert info.frames == 30 and info.times == pytest.approx(VFR_TIMES, abs=1e-3)  # mkv: milliseconds
        # frame numbers are positions in the stream, whatever the rate around them
        assert gray_index(decode_frames(path, list(range(30)))) == list(range(30)), path.name
        assert gray_index(decode_frames(path, [29, 4, 5, 6, 7, 4])) == [29, 4, 5, 6, 7, 4], path.name
        expected = np.linspace(0, 29, 9).round().astype(int).tolist()
        assert gray_index(load_clip(path, 9, 16, 16)) == expected, path.name
        decoded.clear()
        assert gray_index(decode_frames(path, [27])) == [27]  # from the keyframe at 24, not from the start
        assert len(decoded) <= 12, (path.name, len(decoded))
        # "fps": target frame k is the frame whose timestamp is nearest k / fps
        for fps in (7, 13, 30):
            targets = np.arange(int(end * fps) + 1) / fps
            targets = targets[targets < end]
            distance = np.abs(times[None, :] - targets[:, None])
            expected = distance.argmin(1).tolist()
            second = np.sort(distance, 1)[:, 1]
            assert np.all(second - distance.min(1) > 2e-3)  # no near-tie that millisecond timestamps could flip
            got = gray_index(load_clip(path, len(targets), 16, 16, "fps", fps=fps))
            assert got == expected, (path.name, fps)
            assert frames_available(30, "fps", fps=fps, times=info.times) == len(targets)  # for buckets
            with pytest.raises(ValueError, match="fewer than"):
                load_clip(path, len(targets) + 1, 16, 16, "fps", fps=fps)
    assert expected[:8] == [0, 0, 1, 1, 1, 2, 2, 2]  # at 30 fps the 10-fps part repeats frames...
    assert expected[-24:] == list(range(6, 30))  # ...and the 30-fps part is taken frame by frame


def test_unreadable_or_short_video_is_skipped_with_a_warning(tmp_path, caplog):
    write_video(tmp_path / "short.mp4", np.zeros((4, 32, 32, 3), np.uint8))
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    clips = [Clip(tmp_path / "short.mp4", "s"), Clip(tmp_path / "broken.mp4", "b"),
             Clip(CLIPS / "green_drop.mp4", "g")]
    with pytest.raises(ValueError, match="short.mp4 has 4 frames, fewer than the 9 needed"):
        load_clip(clips[0].video, 9, 32, 32)
    ds = VideoClipDataset(clips, num_frames=9, height=32, width=32)
    with caplog.at_level("WARNING"):
        item = ds[0]
    assert item["index"] == 2 and item["caption"] == "g" and item["video"].shape == (9, 3, 32, 32)
    assert item["skipped"] == [str(tmp_path / "short.mp4"), str(tmp_path / "broken.mp4")]
    assert "short.mp4" in caplog.text and "broken.mp4" in caplog.text
    with pytest.raises(RuntimeError, match="none of the 2 clips"):
        VideoClipDataset(clips[:2], num_frames=9, height=32, width=32)[0]


def test_batch_sampler_resumes_and_shards():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    full = take(ResumableBatchSampler(10, 2, seed=3), 12)  # 5 batches per epoch, 2+ epochs
    assert take(ResumableBatchSampler(10, 2, seed=3, start=7), 5) == full[7:]
    assert sorted(sum(full[:5], [])) == list(range(10)) and full[:5] != full[5:10]
    r0 = take(ResumableBatchSampler(10, 2, num_replicas=2, rank=0, seed=3), 4)
    r1 = take(ResumableBatchSampler(10, 2, num_replicas=2, rank=1, seed=3), 4)
    assert not set(sum(r0[:2], [])) & set(sum(r1[:2], []))  # the processes read different clips
    with pytest.raises(ValueError, match="3 usable clips are fewer than one global batch"):
        ResumableBatchSampler(3, 2, num_replicas=2)


def test_fingerprint_changes_with_content_caption_and_settings(tmp_path):
    shutil.copy(CLIPS / "green_drop.mp4", tmp_path / "a.mp4")
    clip = Clip(tmp_path / "a.mp4", "g")
    settings = {"height": 32, "teacher": {"name": "videomae"}}
    key = clip_fingerprint(clip, settings)
    assert key == clip_fingerprint(Clip(tmp_path / "a.mp4", "g"), dict(settings))
    assert key != clip_fingerprint(Clip(clip.video, "other"), settings)
    assert key != clip_fingerprint(clip, {**settings, "height": 64})
    assert key != clip_fingerprint(clip, {**settings, "teacher": {"name": "vjepa2"}})
    shutil.copy(CLIPS / "red_throw_right.mp4", tmp_path / "a.mp4")  # same path, new content
    assert key != clip_fingerprint(clip, settings)
    cache = FeatureCache(tmp_path / "cache")
    assert key not in cache and cache.load(key) is None
    cache.save(key, {"x": torch.ones(2, 3)})
    assert key in cache and torch.equal(cache.load(key)["x"], torch.ones(2, 3))


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    from gendistill.testing.video import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("tiny"))["cogvideox"]


def test_generate_cli_writes_repeatable_videos(tiny_pipeline_dir, tmp_path, capsys):
    from gendistill.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# demo\na red ball bounces\n\na blue ball falls\n")
    common = ["generate", "--model", str(tiny_pipeline_dir), "--prompts", str(prompts), "--steps", "2",
              "--frames", "9", "--height", "32", "--width", "32", "--device", "cpu"]
    assert main(common + ["--out", str(tmp_path / "a")]) == 0
    assert "generated 2 video(s)" in capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "a").glob("*.mp4"))
    assert names == ["0000_a-red-ball-bounces.mp4", "0001_a-blue-ball-falls.mp4"]
    assert main(common + ["--out", str(tmp_path / "b")]) == 0
    for name in names:
        a, b = read_video(tmp_path / "a" / name), read_video(tmp_path / "b" / name)
        assert a.shape == (9, 32, 32, 3) and np.array_equal(a, b)  # seeded per prompt: the same video
    assert not np.array_equal(read_video(tmp_path / "a" / names[0]), read_video(tmp_path / "a" / names[1]))


def test_generate_bad_paths_are_clear(tiny_pipeline_dir, tmp_path, capsys):
    from gendistill.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a ball\n")
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompts", str(prompts), "--out", str(tmp_path)]) == 2
    assert "nope does not exist" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_pipeline_dir), "--prompts", str(tmp_path / "none.txt"),
                 "--out", str(tmp_path)]) == 2
    assert "prompts file" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_pipeline_dir), "--lora", str(tmp_path / "nolora"),
                 "--prompts", str(prompts), "--out", str(tmp_path)]) == 2
    assert "LoRA weights" in capsys.readouterr().err


def test_file_digests_reuse_the_index_while_size_and_mtime_match(tmp_path, monkeypatch):
    import gendistill.video_distill.data as data

    files = [tmp_path / f"{i}.mp4" for i in range(3)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * (100 + i))
    index = tmp_path / "cache" / "file_digests.json"
    expect = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    assert data.file_digests(files, index) == expect and index.is_file()

    read = []
    monkeypatch.setattr(data, "file_digest", lambda p: read.append(p) or file_digest(p))
    assert data.file_digests(files, index) == expect and read == []  # a stat per file, no reading
    files[1].write_bytes(b"new content")  # size and mtime change
    expect[1] = hashlib.sha256(b"new content").hexdigest()
    assert data.file_digests(files, index) == expect and read == [str(files[1])]
    index.write_text("{not json")  # a damaged index is rebuilt, never trusted
    assert data.file_digests(files, index) == expect and len(read) == 4
    assert json.loads(index.read_text())[str(files[1])][2] == expect[1]
