"""Memory bounds: `batch_render` streams frames (its memory does not grow with the frame count) and
the cpu backend's backward keeps a bounded gradient scratch (not one buffer per thread of every
camera's Gaussians); both give the same outputs as before."""

import tracemalloc
from pathlib import Path

import imageio.v3 as iio
import numba
import numpy as np
import pytest
import torch

from gendistill import batch_render
from gendistill.batch_render import RenderJob, render_frames, render_scenes, scene_cameras
from gendistill.core.media import read_video
from gendistill.core.render import cpu_backend
from gendistill.core.render.cpu_backend import backward_scratch_bytes, rasterize_to_pixels_cpu
from gendistill.core.render.cpu_layer import composite_with_layers
from gendistill.core.scene import GaussianScene
from test_render_cpu import assert_grads_match, random_scene
from test_render_cpu_layer import HEIGHT, TILE, WIDTH, bounded, layers_of
from test_render_cpu_layer import weighted_grads as layer_grads

SNOWMAN = Path(__file__).resolve().parents[1] / "assets" / "scenes" / "snowman.ply"


# --------------------------------------------------------------------------- batch_render


def reference_frames(job: RenderJob) -> list[np.ndarray]:
    """The snowman's frames for `job`, rendered directly (no files, no streaming)."""
    scene = GaussianScene.load_ply(SNOWMAN)
    cams = scene_cameras(scene, job)
    return [image for _, image in render_frames(scene, cams, range(len(cams)), job)]


def traced_peak(fn) -> int:
    """Peak bytes that Python, numpy and numba allocate while fn() runs (tracemalloc)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def held_between_batches(monkeypatch, fn) -> int:
    """The most bytes (tracemalloc) that fn() holds whenever it starts rendering a batch of frames or
    writes an image (a PNG frame, the contact sheet): what it keeps from frame to frame, without the
    rasterizer's passing peak (scores of frames' worth of float64 buffers)."""
    samples = []
    render, write_image = GaussianScene.render, batch_render.write_image
    sample = lambda: samples.append(tracemalloc.get_traced_memory()[0])  # noqa: E731
    monkeypatch.setattr(GaussianScene, "render", lambda *a, **k: (sample(), render(*a, **k))[1])
    monkeypatch.setattr(batch_render, "write_image", lambda *a, **k: (sample(), write_image(*a, **k))[1])
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        fn()
    finally:
        tracemalloc.stop()
    return max(samples) - base


def test_render_memory_does_not_grow_with_the_frame_count(tmp_path, monkeypatch):
    """16 and 64 frames (both keep 12 for the contact sheet): what a run holds from batch to batch
    grows by less than 4 frames, where holding the frames (for the encoder or the contact sheet)
    would add 48."""
    size = (128, 128)
    frame_bytes = size[0] * size[1] * 3
    render_scenes([SNOWMAN], tmp_path / "warm", RenderJob(frames=2, size=size, fmt="both"))  # numba, ffmpeg
    held = {}
    for n in (16, 64):
        job = RenderJob(frames=n, size=size, fmt="both")
        held[n] = held_between_batches(monkeypatch, lambda: render_scenes([SNOWMAN], tmp_path / str(n), job))
    assert held[64] - held[16] < 4 * frame_bytes, held
    assert held[16] > 6 * frame_bytes, held  # the contact sheet's frames are seen: the figures can fail
    folder = tmp_path / "64" / "snowman"
    assert read_video(folder / "turntable.mp4").shape == (64, 128, 128, 3)
    assert len(list((folder / "frames").glob("*.png"))) == 64


def test_streamed_outputs_equal_the_frames_rendered_directly(tmp_path):
    job = RenderJob(frames=9, size=(64, 48), fmt="both", background=(1.0, 1.0, 1.0), batch=4)
    ref = reference_frames(job)
    render_scenes([SNOWMAN], tmp_path, job)
    folder = tmp_path / "snowman"
    for i, want in enumerate(ref):
        assert np.array_equal(iio.imread(folder / "frames" / f"{i:05d}.png"), want), i
    video = read_video(folder / "turntable.mp4")
    assert video.shape == (9, 48, 64, 3)
    assert np.abs(video.astype(float) - np.stack(ref).astype(float)).mean() < 3.0  # H.264 round-off
    # the frames encoded in one call, as batch_render did before it streamed
    iio.imwrite(tmp_path / "whole.mp4", np.stack(ref), extension=".mp4", fps=job.fps, codec="libx264",
                macro_block_size=1)
    assert np.array_equal(video, read_video(tmp_path / "whole.mp4"))
    # the sheet shows the 9 frames, 6 per row, at full size (below SHEET_MAX_SIDE)
    sheet = iio.imread(folder / "contact_sheet.png")
    assert sheet.shape == (2 * (48 + 2) + 2, 6 * (64 + 2) + 2, 3)
    assert np.array_equal(sheet[2:50, 2 + 66 : 66 + 66], ref[1])
    assert sorted(p.name for p in folder.iterdir()) == ["contact_sheet.png", "frames", "turntable.mp4"]


def test_contact_sheet_keeps_downsized_frames(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(batch_render, "SHEET_MAX_SIDE", 32)
    job = RenderJob(frames=3, size=(64, 48), fmt="png")
    render_scenes([SNOWMAN], tmp_path, job)
    folder = tmp_path / "snowman"
    sheet = iio.imread(folder / "contact_sheet.png")
    assert sheet.shape == (2 * (24 + 2) + 2, 2 * (32 + 2) + 2, 3)  # 3 frames as 32x24, 2 per row
    small = np.asarray(Image.fromarray(iio.imread(folder / "frames" / "00002.png")).reduce(2))
    assert np.array_equal(sheet[28:52, 2:34], small)
    assert not (folder / "turntable.mp4").exists()


def test_interrupted_render_leaves_no_partial_video(tmp_path, monkeypatch):
    """A render that fails halfway keeps the previous video whole and leaves no temporary file."""
    job = RenderJob(frames=6, size=(32, 32), fmt="mp4", batch=2)
    render_scenes([SNOWMAN], tmp_path, job)
    folder = tmp_path / "snowman"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert sorted(before) == ["contact_sheet.png", "turntable.mp4"]

    real, calls = GaussianScene.render, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the second batch: frames 0 and 1 are in the encoder already
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GaussianScene, "render", failing)
    with pytest.raises(KeyboardInterrupt):
        render_scenes([SNOWMAN], tmp_path, RenderJob(frames=6, size=(32, 32), fmt="mp4", batch=2,
                                                     background=(1.0, 1.0, 1.0)))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


# --------------------------------------------------------------------------- cpu backward


def backward_peak(scene, width, height) -> tuple[int, torch.Tensor]:
    """(Peak numpy bytes of the backward beyond the float64 gradients it returns, the means2d gradient)."""
    means2d, conics, colors, opacities, depths, radii, bg = scene
    m = means2d.clone().requires_grad_(True)
    r, a = rasterize_to_pixels_cpu(m, conics, colors, opacities, depths, radii, width, height, bg)
    loss = (r * r).sum() + (a * a).sum()  # torch makes dense output gradients (unlike a.sum()'s expanded ones)
    peak = traced_peak(loss.backward)
    n_cams, n_gauss, dim = colors.shape
    return peak - n_cams * n_gauss * (6 + dim) * 8, m.grad


def test_backward_scratch_depends_on_neither_threads_nor_cameras_nor_gaussians(monkeypatch):
    """With a 48 KiB budget, 1 camera x 1,500 Gaussians x 1 thread and 3 x 6,000 x 2 threads take the
    same scratch (under the budget), where one buffer per thread of every camera's Gaussians took
    1,500 x 9 x 8 = 108 KB and 2 x 18,000 x 9 x 8 = 2.6 MB; the gradients are the same to the bit
    as with the default budget (one run of tiles) and with either thread count."""
    width = height = 128
    budget = 48 << 10
    dim = 3
    threads = sorted({1, numba.get_num_threads()})
    small = random_scene(1, 1500, dim, width, height, seed=1, scale=(0.5, 3.0))
    large = random_scene(3, 6000, dim, width, height, seed=2, scale=(0.5, 3.0))
    assert backward_scratch_bytes(dim) >= 10 * 2**20  # the default: runs of a few hundred thousand entries
    ref = {key: backward_peak(sc, width, height)[1] for key, sc in (("small", small), ("large", large))}
    monkeypatch.setattr(cpu_backend, "BACKWARD_SCRATCH_BYTES", budget)
    assert backward_scratch_bytes(dim) <= budget
    before = numba.get_num_threads()
    peaks = {}
    try:
        for n in threads:
            numba.set_num_threads(n)
            for key, sc in (("small", small), ("large", large)):
                peaks[key, n], grad = backward_peak(sc, width, height)
                assert torch.equal(grad, ref[key]), (key, n)
    finally:
        numba.set_num_threads(before)
    slack = (64 << 10) + (32 << 10) * max(threads)  # the runs' tile assignments, each worker's tile buffers
    assert max(peaks.values()) < budget + slack, peaks
    assert peaks["small", threads[0]] > budget // 2, peaks  # the scratch is in the figures: they can fail


def test_gradients_with_many_small_runs_match_the_dense_reference(monkeypatch):
    """A budget of ~20 entries splits the tile lists into many runs (and some lists are longer than a
    run); the gradients still match the float64 dense compositor."""
    monkeypatch.setattr(cpu_backend, "BACKWARD_SCRATCH_BYTES", 20 * (8 * (6 + 5) + 1))
    width, height = 30, 22
    assert_grads_match(random_scene(2, 40, 5, width, height, seed=7, non_pd=0.1), width, height, 8)


def test_layer_gradients_do_not_depend_on_the_runs(monkeypatch):
    layer = bounded(random_scene(2, 90, 4, WIDTH, HEIGHT, seed=3, scale=(1.0, 4.0)), 3)
    set_ = bounded(random_scene(2, 25, 4, WIDTH, HEIGHT, seed=13, scale=(0.5, 3.0)), 4)
    layers = layers_of(layer)

    def run():
        return layer_grads(lambda m, c, col, o: composite_with_layers(m, c, col, o, set_[4], set_[5], layers,
                                                                      layer[6], TILE), set_)[1]

    whole = run()
    monkeypatch.setattr(cpu_backend, "BACKWARD_SCRATCH_BYTES", 7 * (8 * (6 + 4) + 1))
    runs = run()
    for a, b in zip(whole, runs):
        assert torch.equal(a, b)
    assert min(g.abs().max() for g in whole) > 0
