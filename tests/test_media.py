import numpy as np
import pytest
import torch

from gendistill.core.io import atomic_path
from gendistill.core.media import contact_sheet, read_video, to_uint8, write_image, write_video


def test_to_uint8_rounds_clips_and_expands_gray():
    img = torch.tensor([[[-0.5], [0.5], [1.5]]])  # [1, 3, 1]
    out = to_uint8(img)
    assert out.dtype == np.uint8 and out.shape == (1, 3, 3)
    assert out[0, :, 0].tolist() == [0, 128, 255]


def test_video_round_trip_keeps_frames_and_pads_odd_sizes(tmp_path):
    rng = np.random.default_rng(0)
    # smooth frames so H.264 keeps them close
    base = np.linspace(0, 1, 47)[None, None, :, None] * np.ones((6, 33, 47, 3))
    frames = np.clip(base + 0.1 * np.arange(6)[:, None, None, None] + 0.01 * rng.random((6, 33, 47, 3)), 0, 1)
    write_video(tmp_path / "v.mp4", frames, fps=5)
    back = read_video(tmp_path / "v.mp4")
    assert back.shape == (6, 34, 48, 3)
    err = np.abs(back[:, :33, :47].astype(float) - to_uint8(frames).astype(float)).mean()
    assert err < 4.0, err


def test_read_video_names_the_bad_file(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(ValueError, match="broken.mp4"):
        read_video(bad)


def test_contact_sheet_layout():
    ims = [np.full((4, 5, 3), i * 40, np.uint8) for i in range(5)]
    sheet = contact_sheet(ims, cols=3, pad=1)
    assert sheet.shape == (2 * 5 + 1, 3 * 6 + 1, 3)
    assert sheet[1, 1, 0] == 0 and sheet[1, 7, 0] == 40 and sheet[6, 7, 0] == 160
    assert sheet[6, 13, 0] == 255  # empty cell stays background


def test_atomic_path_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "out.png"
    write_image(target, np.zeros((2, 2, 3)))
    before = target.read_bytes()
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_atomic_path_syncs_and_respects_the_umask_without_changing_it(tmp_path, monkeypatch):
    import os

    synced, umasks = [], []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    real_umask = os.umask
    monkeypatch.setattr(os, "umask", lambda m: (umasks.append(m), real_umask(m))[1])
    old = real_umask(0o027)
    try:
        with atomic_path(tmp_path / "a.bin") as tmp:
            tmp.write_bytes(b"data")
    finally:
        real_umask(old)
    assert (tmp_path / "a.bin").read_bytes() == b"data"
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o640  # 0666 less the umask 027
    assert umasks == []  # the process-wide umask is never touched (threads may be creating files)
    assert synced[-1] == str(tmp_path) and any(s.endswith(".bin") for s in synced[:-1])  # the file, then its folder
