"""Synthetic physics clips (simulation, captions, negatives, the clip tool) and the physics metric."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gendistill.video_distill.data import discover_clips, load_clip
from gendistill.video_distill.physics import (
    BREAK_KINDS,
    COLOURS,
    auc,
    break_clip,
    fit_trajectory,
    parse_caption,
    physics_score,
    simulate_clip,
    simulate_trajectory,
    summarize,
    track_ball,
    write_clip,
)

ROOT = Path(__file__).resolve().parents[1]


def _trajectories(n, seed=0, frames=(9, 13), **kwargs):
    rng = np.random.default_rng(seed)
    return [simulate_trajectory(rng, frames[i % len(frames)], 32, **kwargs) for i in range(n)]


def test_trajectories_follow_closed_form_ballistics():
    for traj in _trajectories(30, bounces=None, min_bounces=1):
        x, y, g, e, f = (np.asarray(traj["x"]), np.asarray(traj["y"]), traj["gravity"], traj["restitution"],
                         traj["friction"])
        contact = traj["floor_y"] - traj["radius"]
        first = traj["bounce_times"][0]
        # launch speed from the first two frames (no bounce before frame 1.5), then the closed form
        vx0, vy0 = x[1] - x[0], y[1] - y[0] - g / 2
        hit = (-vy0 + math.sqrt(vy0**2 + 2 * g * (contact - y[0]))) / g  # y0 + vy0 t + g t^2 / 2 = contact
        assert hit == pytest.approx(first, abs=1e-9)
        for t in range(len(y)):
            if t < first:
                assert y[t] == pytest.approx(y[0] + vy0 * t + g * t * t / 2, abs=1e-9)
                assert x[t] == pytest.approx(x[0] + vx0 * t, abs=1e-9)
        # after the first bounce: vertical speed reversed and scaled by e, horizontal by the friction
        up, vx1 = e * (vy0 + g * first), f * vx0
        later = traj["bounce_times"][1] if len(traj["bounce_times"]) > 1 else len(y)
        for t in range(math.ceil(first), min(len(y), math.ceil(later))):
            d = t - first
            assert y[t] == pytest.approx(contact - up * d + g * d * d / 2, abs=1e-9)
            assert x[t] == pytest.approx(x[0] + vx0 * first + vx1 * d, abs=1e-9)
        # constant acceleration between bounces: second differences g (y) and 0 (x) away from bounces
        for t in range(1, len(y) - 1):
            if not any(t - 1 < b < t + 1 for b in traj["bounce_times"]):
                assert y[t + 1] - 2 * y[t] + y[t - 1] == pytest.approx(g, abs=1e-9)
                assert x[t + 1] - 2 * x[t] + x[t - 1] == pytest.approx(0, abs=1e-9)
        r = traj["radius"]
        assert y.max() <= contact + 1e-9 and y.min() >= r and x.min() >= r and x.max() <= 32 - r


def test_captions_match_trajectories():
    seen = set()
    for traj in _trajectories(40, seed=1):
        x, y = np.asarray(traj["x"]), np.asarray(traj["y"])
        said = parse_caption(traj["caption"])
        assert said["colour"] == traj["colour"] and traj["caption"].startswith(f"a {traj['colour']} ball is ")
        lowest = [k for k in range(1, len(y) - 1) if y[k] > y[k - 1] and y[k] >= y[k + 1]]  # visible bounces
        assert said["bounces"] == len(lowest) == len(traj["bounce_times"])
        if said["motion"] == "thrown to the right":
            assert x[-1] - x[0] >= 0.15 * 32
        elif said["motion"] == "thrown to the left":
            assert x[0] - x[-1] >= 0.15 * 32
        else:
            assert np.all(x == x[0])
            assert (y[1] < y[0]) == (said["motion"] == "thrown up")
        seen.add((said["motion"], said["bounces"]))
    assert {b for _, b in seen} == {0, 1, 2} and len({m for m, _ in seen}) == 4


def test_tracker_recovers_the_ball_on_clean_frames():
    rng = np.random.default_rng(2)
    for i in range(12):
        frames, traj, _ = simulate_clip(rng, 13 if i % 2 else 9, 32)
        for colour in (traj["colour"], None):
            track = track_ball(frames, colour)
            assert track["found"].all() and track["colour"] == traj["colour"]
            err = np.hypot(track["x"] - traj["x"], track["y"] - traj["y"])
            assert err.max() < 0.2
            assert np.abs(track["radius"] - traj["radius"]).max() < 0.2
    # channels-first float frames (what load_clip returns) track the same
    chw = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    np.testing.assert_allclose(track_ball(chw)["x"], track["x"], atol=1e-4)
    # another colour prompted: nothing is found, the ball's own colour is still detected
    for other in (c for c in COLOURS if c != traj["colour"]):
        wrong = track_ball(frames, other)
        assert not wrong["found"].any() and wrong["colour"] == traj["colour"]
        score = physics_score(frames, other)
        assert not score["found"] and score["colour_match"] is False and score["plausibility"] == -32


def test_metric_separates_real_from_broken_clips():
    rng = np.random.default_rng(3)
    real, broken = [], {k: [] for k in BREAK_KINDS}
    for i in range(32):
        frames, traj, caption = simulate_clip(rng, 9 if i % 2 else 13, 32, min_bounces=1)
        real.append(physics_score(frames, caption=caption))
        kind = BREAK_KINDS[i % len(BREAK_KINDS)]
        bad, _ = break_clip(rng, traj, kind)
        broken[kind].append(physics_score(bad, traj["colour"]))
    assert all(s["found"] and s["colour_match"] and s["gravity_down"] and s["bounces_at_floor"] for s in real)
    assert all(s["caption_bounces_match"] and s["caption_motion_match"] for s in real)
    assert max(s["implausibility_px"] for s in real) < 0.5
    assert not any(s["gravity_down"] for s in broken["gravity_flipped"])
    assert all(s["restitution_max"] > 1 or s["bounce_gain_px"] > 0.3 for s in broken["reversed"])
    scores = [s["plausibility"] for s in real]
    for kind, bad in broken.items():
        assert auc(scores, [s["plausibility"] for s in bad]) >= 0.9, kind
    assert auc(scores, [s["plausibility"] for b in broken.values() for s in b]) >= 0.95


def test_fit_tolerates_noise_and_uses_a_known_floor():
    t = np.arange(13.0)
    x, y = 5 + 1.5 * t, 20 - 4 * t + 0.3 * t**2  # thrown up, no bounce, apex near frame 6.7
    wobbly = y.copy()
    wobbly[7] += 0.25  # tracking noise makes frame 7 a (0.1 px deep) lowest point
    wobbly[8] -= 0.35
    fit = fit_trajectory(x, wobbly)
    assert fit["bounces"] == 0 and fit["implausibility_px"] < 0.5 and fit["gravity"] == pytest.approx(0.6, abs=0.05)

    frames, traj, _ = simulate_clip(np.random.default_rng(6), 13, 32, bounces=1)
    right = physics_score(frames, traj["colour"], floor_y=traj["floor_y"])
    wrong = physics_score(frames, traj["colour"], floor_y=traj["floor_y"] + 4)
    assert right["bounces_at_floor"] and right["implausibility_px"] < 0.3
    assert not wrong["bounces_at_floor"] and wrong["bounce_floor_px"] > 3


def test_reversing_needs_a_bounce_and_kinds_are_checked():
    rng = np.random.default_rng(4)
    traj = simulate_trajectory(rng, 9, 32, bounces=0)
    with pytest.raises(ValueError, match="bounce"):
        break_clip(rng, traj, "reversed")
    with pytest.raises(ValueError, match="unknown break kind"):
        break_clip(rng, traj, "melted")
    frames, bad = break_clip(rng, traj, "teleport")
    assert frames.shape == (9, 32, 32, 3) and bad["broken"] == "teleport" and 2 <= bad["teleport_frame"] <= 7


def test_auc_and_summary():
    assert auc([1, 2, 3], [0, 1]) == pytest.approx(5.5 / 6)
    assert auc([5, 6], [1, 2]) == 1.0 and auc([1], [1]) == 0.5
    scores = [{"found": True, "colour": "red", "residual_px": v, "gravity_down": v < 2} for v in (1.0, 2.0, 3.0)]
    out = summarize(scores)
    assert out["n"] == 3 and "colour" not in out
    assert out["residual_px"]["mean"] == pytest.approx(2.0)
    assert out["residual_px"]["low"] < 2.0 < out["residual_px"]["high"]
    assert out["gravity_down"]["mean"] == pytest.approx(1 / 3) and out["found"]["mean"] == 1.0


def test_tool_writes_clips_the_data_reader_reads(tmp_path):
    spec = importlib.util.spec_from_file_location("make_physics_clips", ROOT / "tools" / "make_physics_clips.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    paths = tool.make_clips(tmp_path, n=2, frames=9, broken=True, kinds=("reversed", "shuffled"), progress=False)
    trajectories = json.loads(paths["trajectories"].read_text())
    clips, problems = discover_clips(paths["manifest"])
    assert len(clips) == 2 and problems == []
    for clip in clips:
        video = load_clip(clip.video, 9, 32, 32)  # data.py's reader: [9, 3, 32, 32] float in [0, 1]
        assert video.shape == (9, 3, 32, 32)
        traj = trajectories[clip.video.relative_to(tmp_path).as_posix()]
        assert clip.caption == traj["caption"]
        track = track_ball(video, traj["colour"])  # the colour survives the lossless mp4
        assert np.hypot(track["x"] - traj["x"], track["y"] - traj["y"]).max() < 0.2
        score = physics_score(video, caption=clip.caption)
        assert score["colour_match"] and score["implausibility_px"] < 0.5
    bad, _ = discover_clips(paths["broken"])
    assert [c.video.name for c in bad] == ["reversed_00000.mp4", "shuffled_00001.mp4"]
    assert "label" in paths["broken"].read_text().splitlines()[0]
    assert all(physics_score(load_clip(c.video, 9, 32, 32), caption=c.caption)["implausibility_px"] > 1 for c in bad)

    # yuv420p h264 smears the small ball's colour but the tracker still finds it
    frames, traj, _ = simulate_clip(np.random.default_rng(5), 9, 32)
    write_clip(tmp_path / "h264.mp4", frames, quality="h264")
    track = track_ball(load_clip(tmp_path / "h264.mp4", 9, 32, 32))
    assert track["colour"] == traj["colour"]
    assert np.hypot(track["x"] - traj["x"], track["y"] - traj["y"]).max() < 0.5
