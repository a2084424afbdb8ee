"""Ball-physics clips (synthetic data) and a physics plausibility metric for generated videos.

    rng = np.random.default_rng(0)
    frames, traj, caption = simulate_clip(rng, frames=13, size=32)   # uint8 [13, 32, 32, 3], dict, str
    bad, bad_traj = break_clip(rng, traj, "reversed")                # a negative: same ball, broken physics
    s = physics_score(frames, colour="red")     # {"found", "residual_px", "gravity", "gravity_down", ...}
    summarize([s, ...])                         # per field: mean and 95% t interval

Coordinates are pixels, x to the right, y down (image rows), pixel (i, j) covering [j, j+1) x [i, i+1),
so its centre is (j + 0.5, i + 0.5); time is the frame index. Gravity is +y.

Simulation: a ball of one named colour on a neutral grey background (sky gradient, a floor band below
`floor_y`) is thrown left / right, dropped or thrown up under constant gravity, and bounces on the
floor (restitution e < 1 on vertical speed, friction on horizontal speed), solved exactly between
bounces. Clips are drawn by rejection so that every bounce is visible in the sampled frames (not in
the first 1.5 or last 2.5 frames, >= 3 frames apart) and the ball stays inside the frame; the
caption ("a red ball is thrown to the right and bounces twice") is derived from the trajectory.

Metric (`physics_score`): the ball is segmented in each frame by colour (the prompted colour, else the
dominant saturated hue), its centre is the chroma-weighted centroid (within 0.05 px on clean frames,
0.3 px after yuv420p H.264). The track is fitted by least squares with one constant-acceleration
model: free flight between bounces with one gravity shared by all pieces, x continuous and linear
between bounces. Every interior local maximum of y (a lowest point) is a bounce, since free flight has
none (but one less than 1 px deep may be tracking noise); the frame at a bounce goes to the piece
before or after it, whichever fits better. The single
plausibility score is minus the "implausibility" in pixels, the sum of:
  - residual_max_px: the largest distance of a tracked centre from the fitted trajectory (the
    largest, not the RMS: a teleport moves few frames, and a least-squares fit spreads it thin);
  - gravity_px: relu(-g) (T-1)^2 / 8, the sag an upward acceleration g produces over half the clip;
  - per bounce: the gap between the two pieces at the contact time, the contact's distance from the
    floor (the known floor, else one level at the lowest point of the motion; 0.5 px free), a wrong
    direction (moving up before or down after) and a gain in speed (vertical or horizontal:
    restitution > 1, what a reversed clip shows), speeds in pixels per frame;
  - missing_px: size * the share of frames where no ball was found.
Real clips score 0.01-0.2 px (noise, H.264), broken ones 1-60 px: `tools/bench_physics_metric.py`
prints the AUC per break kind. The reported gravity direction comes from this fit unless a mirrored one
(bounces on a ceiling) is clearly better, so an upside-down world reads as gravity up.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from typing import Sequence

import numpy as np

from gendistill.core.io import atomic_path

__all__ = [
    "COLOURS",
    "colour_rgb",
    "BREAK_KINDS",
    "simulate_trajectory",
    "render_clip",
    "simulate_clip",
    "break_clip",
    "caption_for",
    "parse_caption",
    "write_clip",
    "track_ball",
    "fit_trajectory",
    "physics_score",
    "plausibility",
    "summarize",
    "auc",
]

# name -> hue in degrees; rendered at saturation 0.85, value 0.9 (far from the grey background)
COLOURS = {"red": 0.0, "yellow": 55.0, "green": 120.0, "cyan": 185.0, "blue": 230.0, "magenta": 300.0}
BREAK_KINDS = ("shuffled", "reversed", "gravity_flipped", "teleport")
MOTIONS = ("thrown to the right", "thrown to the left", "dropped", "thrown up")
_COUNT_WORDS = {0: "does not bounce", 1: "bounces once", 2: "bounces twice", 3: "bounces three times",
                4: "bounces four times"}
_HUE_TOLERANCE = 30.0  # degrees: half the gap between neighbouring COLOURS
_MIN_CHROMA = 0.12  # max(rgb) - min(rgb) below this is background


def colour_rgb(name: str, saturation: float = 0.85, value: float = 0.9) -> np.ndarray:
    """RGB [3] in [0, 1] of a named colour (HSV with the given saturation and value)."""
    h = COLOURS[name] / 60.0
    c = value * saturation
    x = c * (1 - abs(h % 2 - 1))
    rgb = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h) % 6]
    return np.asarray(rgb) + (value - c)


# -- simulation ------------------------------------------------------------------------------------------
def _fly(x0, y0, vx, vy, g, contact_y, e, friction, t_end, max_bounces=12):
    """Exact bouncing flight from t=0 to t_end. Returns pieces [(t_start, x, y, vx, vy)] and bounce times."""
    pieces, bounces, t = [(0.0, x0, y0, vx, vy)], [], 0.0
    x, y = x0, y0
    while t <= t_end and len(bounces) <= max_bounces:
        tau = (-vy + math.sqrt(max(vy * vy + 2 * g * (contact_y - y), 0.0))) / g  # time to reach the floor
        t, x, vy_c = t + tau, x + vx * tau, vy + g * tau
        if t > t_end:
            break
        y, vy, vx = contact_y, -e * vy_c, friction * vx
        bounces.append(t)
        pieces.append((t, x, y, vx, vy))
    return pieces, bounces


def _sample(pieces, g, times):
    """Positions [len(times), 2] of a piecewise ballistic flight at the given times."""
    out = []
    for t in times:
        t0, x, y, vx, vy = [p for p in pieces if p[0] <= t][-1]
        d = t - t0
        out.append((x + vx * d, y + vy * d + 0.5 * g * d * d))
    return np.asarray(out)


def _local_maxima(y: np.ndarray) -> list[int]:
    """Interior indices k with y[k-1] < y[k] >= y[k+1] (the lowest points of a track, y down)."""
    return [k for k in range(1, len(y) - 1) if y[k] > y[k - 1] and y[k] >= y[k + 1]]


def caption_for(colour: str, motion: str, bounces: int) -> str:
    """'a red ball is thrown to the right and bounces twice'."""
    return f"a {colour} ball is {motion} and {_COUNT_WORDS[bounces]}"


def parse_caption(caption: str) -> dict:
    """Inverse of `caption_for`: {"colour", "motion", "bounces"}; a field is None where the caption does not say."""
    text = caption.lower()
    colour = next((c for c in COLOURS if re.search(rf"\b{c}\b", text)), None)
    motion = next((m for m in MOTIONS if m in text), None)
    bounces = next((n for n, words in _COUNT_WORDS.items() if words in text), None)
    return {"colour": colour, "motion": motion, "bounces": bounces}


def simulate_trajectory(rng: np.random.Generator, frames: int = 13, size: int = 32, *, colour: str | None = None,
                        motion: str | None = None, bounces: int | None = None, min_bounces: int = 0,
                        max_bounces: int = 2, max_tries: int = 100000) -> dict:
    """Draw one visible bouncing-ball trajectory.

    Returns {"x", "y": [frames] centre in pixels, "radius", "floor_y", "size", "frames", "colour",
    "rgb": [3], "motion", "gravity" (px/frame^2), "restitution", "friction", "bounce_times" (frame
    units, the visible ones), "caption", "broken": None}. The number of visible bounces is `bounces`,
    else drawn uniformly from min_bounces..max_bounces (the motion then drawn among those that allow
    it). Speeds and gravity scale with size and with 1 / (frames - 1), so 9 and 13 frame clips show
    the same motions.
    """
    if frames < 5:
        raise ValueError(f"a physics clip needs at least 5 frames, got {frames}")
    span = frames - 1
    times = np.arange(frames, dtype=float)
    target = int(rng.integers(min_bounces, max_bounces + 1)) if bounces is None else bounces
    for _ in range(max_tries):
        name = colour or str(rng.choice(list(COLOURS)))
        kind = motion or str(rng.choice(MOTIONS, p=[0.35, 0.35, 0.15, 0.15]))
        r = rng.uniform(0.07, 0.11) * size
        floor_y = rng.uniform(0.72, 0.92) * size
        contact_y = floor_y - r
        g = rng.uniform(60, 300) * size / 32 / span**2
        e, friction = rng.uniform(0.55, 0.85), rng.uniform(0.75, 1.0)
        y0 = rng.uniform(r + 1, contact_y - 0.2 * size)
        if kind in ("thrown to the right", "thrown to the left"):
            x0 = rng.uniform(r + 1, 0.45 * size)
            vx = rng.uniform(0.35, 1.0) * (size - r - x0) / span
            vy = rng.uniform(-60, 20) * size / 32 / span
            if kind == "thrown to the left":
                x0, vx = size - x0, -vx
        else:
            x0, vx = rng.uniform(r + 1, size - r - 1), 0.0
            vy = 0.0 if kind == "dropped" else -rng.uniform(40, 90) * size / 32 / span
        pieces, hits = _fly(x0, y0, vx, vy, g, contact_y, e, friction, span)
        xy = _sample(pieces, g, times)
        visible = [b for b in hits if b < span]
        hops_ok = all(b - a >= 3 for a, b in zip(hits, hits[1:]))  # >= 2 frames of each hop between bounces
        if not (len(visible) == target and hops_ok
                and all(1.5 <= b <= span - 2.5 for b in visible)
                and r <= xy[:, 1].min() and xy[:, 1].max() <= contact_y + 1e-9
                and r <= xy[:, 0].min() and xy[:, 0].max() <= size - r
                and len(_local_maxima(xy[:, 1])) == len(visible)
                and np.abs(np.diff(xy, axis=0)).sum() >= 0.3 * size):
            continue
        if kind.startswith("thrown to") and abs(xy[-1, 0] - xy[0, 0]) < 0.15 * size:
            continue
        return {"x": xy[:, 0].tolist(), "y": xy[:, 1].tolist(), "radius": float(r), "floor_y": float(floor_y),
                "size": int(size), "frames": int(frames), "colour": name, "rgb": colour_rgb(name).tolist(),
                "motion": kind, "gravity": float(g), "restitution": float(e), "friction": float(friction),
                "bounce_times": [float(b) for b in visible], "caption": caption_for(name, kind, len(visible)),
                "broken": None}
    raise RuntimeError(f"no valid trajectory in {max_tries} tries (frames={frames}, size={size}, "
                       f"{target} bounces, motion {motion or 'any'})")


def render_clip(traj: dict) -> np.ndarray:
    """uint8 frames [T, size, size, 3] of a trajectory: grey sky gradient, a darker floor band from
    `floor_y` down with a soft shadow under the ball, the ball a flat disc with a one-pixel anti-aliased edge."""
    size, r, floor_y = traj["size"], traj["radius"], traj["floor_y"]
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    sky = 0.82 - 0.18 * yy / size
    background = np.where(yy >= floor_y, 0.45 - 0.05 * (yy - floor_y) / size, sky)
    floor = np.clip(yy - floor_y + 0.5, 0, 1)  # anti-aliased floor line
    background = sky * (1 - floor) + background * floor
    rgb = np.asarray(traj["rgb"])
    out = []
    for cx, cy in zip(traj["x"], traj["y"]):
        height = max(floor_y - r - cy, 0.0)
        shadow = 0.25 * np.exp(-((xx - cx) / (1.5 * r)) ** 2 - ((yy - floor_y - 1) / 1.2) ** 2) / (1 + 0.1 * height)
        img = (background * (1 - shadow * floor))[..., None].repeat(3, -1)
        cover = np.clip(r - np.hypot(xx - cx, yy - cy) + 0.5, 0, 1)[..., None]
        img = img * (1 - cover) + cover * rgb
        out.append((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
    return np.stack(out)


def simulate_clip(rng: np.random.Generator, frames: int = 13, size: int = 32,
                  **kwargs) -> tuple[np.ndarray, dict, str]:
    """(uint8 frames [frames, size, size, 3], trajectory dict, caption); kwargs go to `simulate_trajectory`."""
    traj = simulate_trajectory(rng, frames, size, **kwargs)
    return render_clip(traj), traj, traj["caption"]


def break_clip(rng: np.random.Generator, traj: dict, kind: str) -> tuple[np.ndarray, dict]:
    """A negative made from a real trajectory: (uint8 frames [T, H, W, 3], trajectory with "broken": kind).

    "shuffled": frames in a random order (neither the original nor the reversed one); "reversed": played
    backwards (needs a bounce: a bounce-free throw reversed is still a throw); "gravity_flipped": mirrored
    so the ball accelerates upwards and bounces off the top edge; "teleport": from a frame in the middle
    on, the ball is moved by 0.15-0.3 x size in a random direction (kept inside the frame and above the floor;
    not across a bounce, where a jump up reads as a bounce on a higher floor).
    """
    t = len(traj["x"])
    x, y = np.asarray(traj["x"]), np.asarray(traj["y"])
    out = dict(traj, broken=kind)
    if kind == "shuffled":
        while True:
            order = rng.permutation(t)
            if not (np.all(order == np.arange(t)) or np.all(order == np.arange(t)[::-1])):
                break
        out.update(x=x[order].tolist(), y=y[order].tolist(), order=order.tolist())
    elif kind == "reversed":
        if not traj["bounce_times"]:
            raise ValueError("reversing a clip without a bounce leaves it physical; draw it with min_bounces=1")
        out.update(x=x[::-1].tolist(), y=y[::-1].tolist(), order=list(range(t))[::-1])
    elif kind == "gravity_flipped":
        r, contact_y = traj["radius"], traj["floor_y"] - traj["radius"]
        out.update(y=(contact_y + r - y).tolist())
    elif kind == "teleport":
        size, r, contact_y = traj["size"], traj["radius"], traj["floor_y"] - traj["radius"]
        for _ in range(1000):
            k = int(rng.integers(2, t - 1))
            if any(abs(k - 0.5 - b) < 1.0 for b in traj["bounce_times"]):
                continue  # a jump just across a bounce can pass for a bounce on a higher floor
            angle, jump = rng.uniform(0, 2 * np.pi), rng.uniform(0.15, 0.3) * size
            nx, ny = x.copy(), y.copy()
            nx[k:] += jump * np.cos(angle)
            ny[k:] += jump * np.sin(angle)
            if nx.min() >= r and nx.max() <= size - r and ny.min() >= r and ny.max() <= contact_y:
                out.update(x=nx.tolist(), y=ny.tolist(), teleport_frame=k)
                break
        else:
            raise RuntimeError("no room to teleport the ball")
    else:
        raise ValueError(f"unknown break kind {kind!r}; one of {BREAK_KINDS}")
    return render_clip(out), out


def write_clip(path: str | os.PathLike, frames: np.ndarray, fps: float = 8.0, quality: str = "lossless") -> None:
    """Write uint8 frames [T, H, W, 3] as an H.264 mp4, atomically.

    quality "lossless": yuv444p at qp 0 (no chroma subsampling; the only loss is the RGB -> YUV rounding,
    +-1-2 levels); "h264": yuv420p at crf 18, what most players expect (chroma at half resolution,
    which smears a small ball's colour into its surroundings). Sizes must be even.
    """
    import imageio.v2 as iio2

    if quality not in ("lossless", "h264"):
        raise ValueError(f"quality must be 'lossless' or 'h264', got {quality!r}")
    if quality == "lossless":
        pix, params = "yuv444p", ["-qp", "0", "-preset", "veryslow"]
    else:
        pix, params = "yuv420p", ["-crf", "18"]
    with atomic_path(path) as tmp:
        writer = iio2.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat=pix,
                                 quality=None, macro_block_size=1, output_params=params, ffmpeg_log_level="error")
        try:
            for frame in frames:
                writer.append_data(np.asarray(frame, np.uint8))
        finally:
            writer.close()


# -- the metric -------------------------------------------------------------------------------------------
def _as_frames(frames) -> np.ndarray:
    """[T, H, W, 3] or [T, 3, H, W], uint8 or float in [0, 1], numpy or torch -> float32 [T, H, W, 3] in [0, 1]."""
    if hasattr(frames, "detach"):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4:
        raise ValueError(f"expected frames [T, H, W, 3] or [T, 3, H, W], got shape {frames.shape}")
    if frames.shape[-1] != 3 and frames.shape[1] == 3:
        frames = frames.transpose(0, 2, 3, 1)
    if frames.shape[-1] != 3:
        raise ValueError(f"expected RGB frames, got shape {frames.shape}")
    if frames.dtype == np.uint8:
        return frames.astype(np.float32) / 255.0
    return np.clip(frames.astype(np.float32), 0.0, 1.0)


def _hue(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hue in degrees [...], chroma = max - min [...]) of RGB [..., 3]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    chroma = mx - mn
    c = np.where(chroma > 1e-6, chroma, 1.0)
    h = np.where(mx == r, ((g - b) / c) % 6, np.where(mx == g, (b - r) / c + 2, (r - g) / c + 4))
    return h * 60.0, chroma


def _angle(a, b):
    return np.abs((np.asarray(a) - b + 180.0) % 360.0 - 180.0)


def track_ball(frames, colour: str | None = None) -> dict:
    """Find the ball in each frame by colour.

    frames: [T, H, W, 3] or [T, 3, H, W], uint8 or float in [0, 1]. The ball's pixels are those whose hue
    is within 30 degrees of the prompted colour's (else of the dominant saturated hue of the clip) and
    whose chroma (max - min of RGB) exceeds 0.12; in each frame the connected blob with the most chroma
    is the ball. Returns {"x", "y": [T] chroma-weighted centroid (nan where not found), "radius": [T]
    sqrt(area / pi) with partial pixels counted by chroma, "found": [T] bool, "hue": the dominant
    saturated hue of the clip in degrees (None if there is none), "colour": the named colour within
    30 degrees of it, whatever was prompted (None if none)}.
    """
    from scipy import ndimage

    rgb = _as_frames(frames)
    t, h, w, _ = rgb.shape
    hue, chroma = _hue(rgb)
    strong = chroma > 0.25
    dominant = None
    if strong.any():  # the peak of a chroma-weighted hue histogram, refined by a circular mean around it
        hs, cs = hue[strong], chroma[strong]
        hist = np.bincount((hs // 10).astype(int) % 36, weights=cs, minlength=36)
        peak = (hist + 0.5 * (np.roll(hist, 1) + np.roll(hist, -1))).argmax() * 10.0 + 5.0
        near = _angle(hs, peak) < _HUE_TOLERANCE
        ang = np.deg2rad(hs[near])
        dominant = float(np.rad2deg(np.arctan2((cs[near] * np.sin(ang)).sum(), (cs[near] * np.cos(ang)).sum())) % 360)
    if colour is not None:
        if colour not in COLOURS:
            raise ValueError(f"unknown colour {colour!r}; one of {', '.join(COLOURS)}")
        target = COLOURS[colour]
    else:
        target = 0.0 if dominant is None else dominant
    xs, ys, radii, found = np.full(t, np.nan), np.full(t, np.nan), np.full(t, np.nan), np.zeros(t, bool)
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    min_area = max(2.0, 0.002 * h * w)
    for i in range(t):
        member = (chroma[i] > _MIN_CHROMA) & (_angle(hue[i], target) < _HUE_TOLERANCE)
        if not member.any():
            continue
        labels, n = ndimage.label(member, structure=np.ones((3, 3)))
        weight = np.where(member, chroma[i] - _MIN_CHROMA, 0.0)
        sums = ndimage.sum(weight, labels, index=np.arange(1, n + 1))
        blob = labels == (int(np.argmax(sums)) + 1)
        wgt = np.where(blob, weight, 0.0)
        area = float(np.clip(chroma[i][blob] / chroma[i][blob].max(), 0, 1).sum())
        if area < min_area:
            continue
        found[i] = True
        xs[i], ys[i] = (wgt * xx).sum() / wgt.sum(), (wgt * yy).sum() / wgt.sum()
        radii[i] = math.sqrt(area / math.pi)
    detected = None
    if dominant is not None:
        nearest = min(COLOURS, key=lambda c: float(_angle(dominant, COLOURS[c])))
        detected = nearest if _angle(dominant, COLOURS[nearest]) < _HUE_TOLERANCE else None
    return {"x": xs, "y": ys, "radius": radii, "found": found, "hue": dominant, "colour": detected}


def _segments(n: int, splits: Sequence[int], sides: Sequence[int]) -> list[np.ndarray]:
    """Index ranges of the pieces when the sample at each split goes to the piece before (side 0) or after (1)."""
    bounds = [0] + [k + 1 - s for k, s in zip(splits, sides)] + [n]
    return [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _fit_pieces(t, x, y, pieces, floor_ref):
    """Least-squares fit of one split of the track into pieces: y = a_s + b_s t + g t^2 / 2 per piece with
    one shared g; x continuous, linear per piece with kinks at the contact times. floor_ref: the known
    contact level (floor_y - radius) or None. Returns (implausibility terms in pixels, fit dict)."""
    n, m = len(t), len(pieces)
    A = np.zeros((n, 2 * m + 1))
    for s, idx in enumerate(pieces):
        A[idx, 2 * s], A[idx, 2 * s + 1] = 1.0, t[idx]
    A[:, -1] = 0.5 * t**2
    coef = np.linalg.lstsq(A, y, rcond=None)[0]
    g = coef[-1]
    ry = y - A @ coef
    tcs, ycs, v_ins, v_outs, gaps = [], [], [], [], []
    for s in range(m - 1):
        a0, b0, a1, b1 = coef[2 * s : 2 * s + 4]
        lo, hi = t[pieces[s][-1]], t[pieces[s + 1][0]]
        tc = float(np.clip((a1 - a0) / (b0 - b1), lo, hi)) if abs(b0 - b1) > 1e-9 else 0.5 * (lo + hi)
        y_in, y_out = a0 + b0 * tc + 0.5 * g * tc**2, a1 + b1 * tc + 0.5 * g * tc**2
        tcs.append(tc), ycs.append(0.5 * (y_in + y_out)), gaps.append(abs(y_in - y_out))
        v_ins.append(b0 + g * tc), v_outs.append(-(b1 + g * tc))  # down before, up after: both > 0
    ycs, v_ins, v_outs = np.asarray(ycs), np.asarray(v_ins), np.asarray(v_outs)
    if floor_ref is not None:  # every contact on the known floor
        floor_err = np.abs(ycs - floor_ref)
    else:  # every contact on one level F, the lowest point of the motion, and none far below the track
        level = max(float(y.max()), float(ycs.max(initial=-np.inf)))
        below = np.maximum(ycs - y.max() - 0.5 * np.maximum(np.maximum(v_ins, v_outs), 0.0), 0.0)
        floor_err = (level - ycs) + below
    B = np.zeros((n, 2 + len(tcs)))
    B[:, 0], B[:, 1] = 1.0, t
    for j, tc in enumerate(tcs):
        B[:, 2 + j] = np.maximum(t - tc, 0.0)
    cx = np.linalg.lstsq(B, x, rcond=None)[0]
    rx = x - B @ cx
    vx = np.cumsum(np.concatenate([[cx[1]], cx[2:]]))  # horizontal speed of each piece
    terms = {
        "residual_max_px": float(np.sqrt((rx**2 + ry**2).max())),
        "gravity_px": float(max(-g, 0.0) * float(t[-1] - t[0]) ** 2 / 8),
        "bounce_gap_px": float(sum(gaps)),
        "bounce_floor_px": float(np.maximum(floor_err - 0.5, 0.0).sum()),
        "bounce_direction_px": float(np.maximum(-v_ins, 0).sum() + np.maximum(-v_outs, 0).sum()),
        "bounce_gain_px": float(np.maximum(v_outs - v_ins, 0).sum()
                                + np.maximum(np.abs(vx[1:]) - np.abs(vx[:-1]), 0).sum()),
    }
    fit = {"gravity": float(g), "residual_px": float(np.sqrt(np.mean(rx**2 + ry**2))), "bounce_times": tcs,
           "bounce_y": ycs.tolist(), "bounce_floor_error": floor_err.tolist(),
           "restitution": [float(o / i) if abs(i) > 1e-6 else float("inf") for i, o in zip(v_ins, v_outs)],
           "vx": vx.tolist()}
    return terms, fit


def fit_trajectory(x, y, t=None, floor_y: float | None = None, radius: float | None = None) -> dict:
    """Fit bouncing constant-acceleration motion to a track x, y [n] (pixels) at frame times t [n].

    Every interior local maximum of y (a lowest point) is a bounce: free flight has none. The sample at
    a bounce goes to the piece before or after it; a maximum less than 1 px above a neighbour may also
    be noise, no bounce. Every such choice is fitted (pieces of >= 2 samples) and the least
    implausible wins. floor_y (with the ball radius): the known floor, else the floor is
    the lowest point of the motion. Returns the implausibility terms ("residual_max_px", "gravity_px",
    "bounce_gap_px", "bounce_floor_px", "bounce_direction_px", "bounce_gain_px"), "implausibility_px"
    (their sum), "residual_px" (RMS), "gravity" (px/frame^2, + is down), "bounces", "bounce_times", "bounce_y",
    "bounce_floor_error", "restitution" (per bounce), "vx" (horizontal speed per piece).
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    t = np.arange(len(x), dtype=float) if t is None else np.asarray(t, float)
    floor_ref = None if floor_y is None else floor_y - (radius or 0.0)
    maxima = _local_maxima(y)
    # a lowest point that rises < 1 px above a neighbour may be tracking noise: it may also be no bounce
    # (the shallowest first, at most 3^4 2^k choices in all)
    depth = {k: y[k] - max(y[k - 1], y[k + 1]) for k in maxima}
    noisy = sorted((k for k in maxima if depth[k] < 1.0), key=depth.get)[:4]
    options = [(0, 1, None) if k in noisy else (0, 1) for k in maxima]
    best = None
    for choice in itertools.product(*options):
        splits = [k for k, c in zip(maxima, choice) if c is not None]
        pieces = _segments(len(t), splits, [c for c in choice if c is not None])
        if min(len(p) for p in pieces) < 2:
            continue
        terms, fit = _fit_pieces(t, x, y, pieces, floor_ref)
        total = sum(terms.values())
        if best is None or total < best[0]:
            best = (total, terms, fit)
    if best is None:  # the bounces leave a one-sample piece whichever way: fit one flight
        terms, fit = _fit_pieces(t, x, y, [np.arange(len(t))], floor_ref)
        best = (sum(terms.values()), terms, fit)
    total, terms, fit = best
    return {**terms, "implausibility_px": float(total), **fit, "bounces": len(fit["bounce_times"])}


def physics_score(frames, colour: str | None = None, *, caption: str | None = None,
                  floor_y: float | None = None) -> dict:
    """Physics plausibility of one clip with one ball. frames: [T, H, W, 3] or [T, 3, H, W], uint8 or float.

    colour: the prompted ball colour (a name in COLOURS); taken from `caption` when not given, else the
    dominant saturated hue is tracked. floor_y: the floor line in pixels when known. Returns a flat dict:
    "found" (ball found in every frame), "found_fraction", "colour" (prompted or None),
    "detected_colour", "colour_match", "gravity" (px/frame^2, + is down: the fitted acceleration, or
    minus that of a fit with bounces on a ceiling where that one is less than half as implausible),
    "gravity_down", "bounces",
    "bounces_at_floor", "restitution_max", "residual_px" (RMS), "residual_max_px", the other
    implausibility terms, "missing_px", "implausibility_px" and "plausibility" (= -implausibility_px,
    the single score; higher is more physical). With a caption also "caption_bounces_match",
    "caption_motion_match" (None where the caption does not say).
    """
    rgb = _as_frames(frames)
    size = max(rgb.shape[1:3])
    wanted = parse_caption(caption) if caption else {"colour": None, "motion": None, "bounces": None}
    colour = colour or wanted["colour"]
    track = track_ball(rgb, colour)
    found = track["found"]
    out = {"found": bool(found.all()), "found_fraction": float(found.mean()), "colour": colour,
           "detected_colour": track["colour"],
           "colour_match": None if colour is None else track["colour"] == colour}
    missing = size * (1.0 - found.mean())
    if found.sum() < 4:
        nan = float("nan")
        out.update(gravity=nan, gravity_down=False, bounces=0, bounces_at_floor=False, restitution_max=nan,
                   residual_px=nan, residual_max_px=nan, missing_px=float(missing), implausibility_px=float(size),
                   plausibility=-float(size))
        return out
    t = np.flatnonzero(found).astype(float)
    radius = float(np.nanmedian(track["radius"]))
    fit = fit_trajectory(track["x"][found], track["y"][found], t, floor_y=floor_y, radius=radius)
    implausible = fit["implausibility_px"] + missing
    # the direction of gravity: the better of this fit and the mirrored one (bounces on a ceiling above)
    mirrored = fit_trajectory(track["x"][found], -track["y"][found], t)
    flipped = mirrored["implausibility_px"] < 0.5 * fit["implausibility_px"]  # clearly the better one
    gravity = -mirrored["gravity"] if flipped else fit["gravity"]
    out.update(
        gravity=gravity, gravity_down=gravity > 0, bounces=fit["bounces"],
        bounces_at_floor=all(e <= 1.0 for e in fit["bounce_floor_error"]),
        restitution_max=max(fit["restitution"], default=float("nan")),
        **{k: fit[k] for k in ("residual_px", "residual_max_px", "gravity_px", "bounce_gap_px", "bounce_floor_px",
                               "bounce_direction_px", "bounce_gain_px")},
        missing_px=float(missing), implausibility_px=float(implausible), plausibility=-float(implausible),
    )
    if caption:
        xs = track["x"][found]
        dx = xs[-1] - xs[0]
        motion = ("thrown to the right" if dx > 0 else "thrown to the left") if abs(dx) >= 0.1 * size else None
        out["caption_bounces_match"] = None if wanted["bounces"] is None else fit["bounces"] == wanted["bounces"]
        if wanted["motion"] in ("thrown to the right", "thrown to the left"):
            out["caption_motion_match"] = motion == wanted["motion"]
        elif wanted["motion"] is not None:
            out["caption_motion_match"] = motion is None
        else:
            out["caption_motion_match"] = None
    return out


def plausibility(score: dict) -> float:
    """The single plausibility scalar of a `physics_score` dict (higher = more physical)."""
    return float(score["plausibility"])


def summarize(scores: Sequence[dict], confidence: float = 0.95) -> dict:
    """Aggregate `physics_score` dicts: {"n", field: {"mean", "low", "high", "n"}} for every numeric or
    boolean field (booleans as rates; None / nan left out), with a Student t interval for the mean."""
    from scipy import stats

    out = {"n": len(scores)}
    keys = [k for k in (scores[0] if scores else {}) if k not in ("colour", "detected_colour")]
    for key in keys:
        vals = [s.get(key) for s in scores]
        vals = np.asarray([float(v) for v in vals if isinstance(v, (bool, int, float, np.bool_, np.number))
                           and v is not None and np.isfinite(float(v))])
        if len(vals) == 0:
            continue
        mean = float(vals.mean())
        if len(vals) > 1:
            half = float(stats.t.ppf(0.5 + confidence / 2, len(vals) - 1) * vals.std(ddof=1) / math.sqrt(len(vals)))
        else:
            half = float("nan")
        out[key] = {"mean": mean, "low": mean - half, "high": mean + half, "n": int(len(vals))}
    return out


def auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Area under the ROC curve: the probability that a positive scores above a negative (ties count half),
    by the Mann-Whitney rank formula."""
    from scipy.stats import rankdata

    pos, neg = np.asarray(positive, float), np.asarray(negative, float)
    ranks = rankdata(np.concatenate([pos, neg]))
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))
