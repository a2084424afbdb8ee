"""Scene formats against files other tools wrote, and ours as other tools read them.

The fixtures in `tests/data/formats` (README there) were written once by
`tools/make_format_fixtures.py`: one seeded source scene (`source_sh3.ply`, 2,000 Gaussians, SH
degree 3, off the origin and asymmetric) converted by PlayCanvas's splat-transform and exported by
gsplat, and our own SPZ and compressed PLY decoded by splat-transform back to PLY (`*.st.ply`), so
no test needs node. Every file is compared Gaussian by Gaussian with the source, matched by
position (writers reorder: Morton curves), in activated quantities where the raw ones are
ill-conditioned, within tolerances derived from each format's bit depths (not fitted to the
files), and first for its axes: a flipped or mirrored axis fails with a message saying so.
"""

from __future__ import annotations

import gzip
import math
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from plyfile import PlyData
from scipy.spatial import cKDTree

from gendistill.core.formats import detect_format, read_scene, write_scene
from gendistill.core.render.sh import SH_C0
from gendistill.core.scene import GaussianScene, SceneFormatError

DATA = Path(__file__).resolve().parent / "data" / "formats"
SLACK = 1e-5  # float32 arithmetic of encoders and decoders on values of magnitude <= 4 (a few ulps)


@pytest.fixture(scope="module")
def source() -> GaussianScene:
    return read_scene(DATA / "source_sh3.ply")[0]


# ---------------------------------------------------------------------------- tolerances
@dataclass
class Tol:
    """The largest error a format allows, per quantity; arrays broadcast against the errors.

    means, log_scales: [N, 3] or a number; opacity (after the sigmoid), quat (|q - q'| of unit
    quaternions, up to sign): numbers; rgb (SH DC as colour, sh0 * C0 + 0.5): [N, 3] or a number;
    sh_rest: [15] per higher coefficient, or None for a format that holds none (read as degree 0).
    """

    means: np.ndarray | float = 0.0
    log_scales: np.ndarray | float = 0.0
    opacity: float = 0.0
    quat: float = 0.0
    rgb: np.ndarray | float = 0.0
    sh_rest: np.ndarray | float | None = 0.0


EXACT = Tol()  # float32 copies: PLY, checkpoints


def smallest_three(mag_bits: int, mag_range: float) -> float:
    """Unit quaternion error of a smallest-three code: three components rounded on `mag_bits`
    levels over `mag_range` (half step h each), the largest (>= 1/2) rebuilt from the unit norm,
    so off by at most (|a| + |b| + |c|) h / (1/2) <= 1.5 h / 0.5 = 3h: |dq| <= sqrt(3h^2 + 9h^2)."""
    h = mag_range / (2 ** mag_bits - 1) / 2
    return math.sqrt(12) * h + SLACK


def compressed_ply_tol(path: Path, n: int) -> Tol:
    """PlayCanvas compressed PLY, per chunk of 256 (in file order): positions and log scales
    11/10/11 bits within the chunk's bounds, colour 8 bits within the chunk's colour bounds, all
    rounded (error half a step); opacity 8 bits of the sigmoid, rounded; rotation smallest three,
    10 bits over [-1/sqrt2, 1/sqrt2]; higher SH 8 bits over [-4, 4), truncated on writing and read
    at the bucket centre (error half of 8/256)."""
    c = PlyData.read(str(path))["chunk"].data
    chunk = np.arange(n) // 256

    def half_step(name: str, axes: str, bits: list[int]) -> np.ndarray:  # [N, 3]
        span = np.stack([c[f"max_{name}{a}"] - c[f"min_{name}{a}"] for a in axes], 1).astype(np.float64)
        return (span / (2 * (2.0 ** np.array(bits) - 1)))[chunk] + SLACK

    return Tol(means=half_step("", "xyz", [11, 10, 11]), log_scales=half_step("scale_", "xyz", [11, 10, 11]),
               opacity=0.5 / 255 + SLACK, quat=smallest_three(10, math.sqrt(2)),
               rgb=half_step("", "rgb", [8, 8, 8]), sh_rest=4 / 256 + SLACK)


def spz_header(path: Path) -> tuple[int, int, int, int]:
    """(version, number of Gaussians, SH degree, fractional bits) of an SPZ file (v1-v3 gzip, v4 raw)."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    magic, version, n, degree, frac = struct.unpack("<4sIIBB", raw[:14])
    assert magic == b"NGSP", f"{path}: not an SPZ header"
    return version, n, degree, frac


def spz_tol(path: Path, sh_bits: tuple[int, int]) -> Tol:
    """Niantic SPZ (v3+): positions fixed point with the header's fractional bits, rounded; log
    scales (s + 10) * 16 rounded to a byte; opacity the sigmoid * 255 rounded; colour
    sh0 * 0.15 * 255 + 127.5 rounded; rotation smallest three, 9-bit magnitudes over [0, 1/sqrt2];
    higher SH rounded to x * 128 + 128, then to a bucket of 2^(8 - bits) (`quantizeSH`), so off by
    (0.5 + bucket / 2) / 128. `sh_bits`: the writer's bits for degree 1 and for degrees 2-3
    (splat-transform and Niantic's library: 5 and 4; gsply, our writer: 8 and 8)."""
    _, _, _, frac = spz_header(path)
    sh_err = lambda bits: (0.5 + (2 ** (8 - bits)) // 2) / 128 + SLACK  # noqa: E731
    return Tol(means=2.0 ** -(frac + 1) + SLACK, log_scales=1 / 32 + SLACK, opacity=0.5 / 255 + SLACK,
               quat=smallest_three(9, 1 / math.sqrt(2)), rgb=SH_C0 * 0.5 / (0.15 * 255) + SLACK,
               sh_rest=np.array([sh_err(sh_bits[0])] * 3 + [sh_err(sh_bits[1])] * 12))


def splat_tol(rotation_decode: str = "antimatter15") -> Tol:
    """antimatter15 `.splat` as gsplat writes it: positions and linear scales float32 (log scales
    off by float32 exp/log only), colour and opacity `(v * 255).to(uint8)`: truncated, so off by
    less than 1/255; rotation `q * 128 + 128` truncated, off by < 1/128 a component, |dq| < 2/128
    before renormalising and < 4/128 after. splat-transform decodes the rotation bytes as
    b / 255 * 2 - 1 rather than (b - 128) / 128, up to 1/128 more a component: < 8/128. No
    higher SH."""
    quat = {"antimatter15": 4 / 128, "splat-transform": 8 / 128}[rotation_decode]
    return Tol(means=0.0, log_scales=2e-6, opacity=1 / 255 + SLACK, quat=quat + SLACK, rgb=1 / 255 + SLACK,
               sh_rest=None)


ST, GSPLAT = "splat-transform", "gsplat"
# fixture -> (format detected, tolerance against the source)
FIXTURES = {
    "source_sh3.ply": ("ply", lambda n: EXACT),
    "st.ply": ("ply", lambda n: EXACT),
    "st.compressed.ply": ("compressed-ply", lambda n: compressed_ply_tol(DATA / "st.compressed.ply", n)),
    "st.spz": ("spz", lambda n: spz_tol(DATA / "st.spz", (5, 4))),
    "st.v3.spz": ("spz", lambda n: spz_tol(DATA / "st.v3.spz", (5, 4))),
    "gsplat.ply": ("ply", lambda n: EXACT),
    "gsplat.splat": ("splat", lambda n: splat_tol()),
    "gsplat.compressed.ply": ("compressed-ply", lambda n: compressed_ply_tol(DATA / "gsplat.compressed.ply", n)),
    "ckpt_99_rank0.pt": ("gsplat-ckpt", lambda n: EXACT),
    "ours.spz": ("spz", lambda n: spz_tol(DATA / "ours.spz", (8, 8))),
    "ours.compressed.ply": ("compressed-ply", lambda n: compressed_ply_tol(DATA / "ours.compressed.ply", n)),
    # the reverse direction: our files as splat-transform decoded them, within the quantisation they went through
    "ours_spz.st.ply": ("ply", lambda n: spz_tol(DATA / "ours.spz", (8, 8))),
    "ours_compressed.st.ply": ("ply", lambda n: compressed_ply_tol(DATA / "ours.compressed.ply", n)),
    "gsplat_splat.st.ply": ("ply", lambda n: splat_tol("splat-transform")),
}
NOT_READ = {"st.sog"}  # SOG: no reader here (see test_sog_is_refused)


# ---------------------------------------------------------------------------- comparison
def assert_same_axes(scene: GaussianScene, src: GaussianScene, name: str) -> None:
    """Centroid and bounds agree: a flipped or mirrored axis moves them by metres, quantisation by < 1e-2."""
    c, c0 = scene.means.double().mean(0).numpy(), src.means.double().mean(0).numpy()
    lo, hi = (t.double().numpy() for t in scene.bbox())
    lo0, hi0 = (t.double().numpy() for t in src.bbox())
    if np.abs(c - c0).max() > 1e-2 or np.abs(lo - lo0).max() > 1e-2 or np.abs(hi - hi0).max() > 1e-2:
        sign = np.where(np.abs(c + c0) < np.abs(c - c0), -1, 1)
        raise AssertionError(f"{name}: axes differ from the source's: centroid {c.round(3)} vs {c0.round(3)}, "
                             f"bounds {lo.round(2)}..{hi.round(2)} vs {lo0.round(2)}..{hi0.round(2)}; "
                             f"axis signs {sign} (SPZ stores RUB, the INRIA PLY RDF: a y/z flip is (1, -1, -1))")


def match(scene: GaussianScene, src: GaussianScene, name: str) -> np.ndarray:
    """[N] index into the source of each Gaussian of `scene`, by nearest position; one to one."""
    assert len(scene) == len(src), f"{name}: {len(scene)} Gaussians, the source has {len(src)}"
    _, idx = cKDTree(src.means.double().numpy()).query(scene.means.double().numpy())
    assert len(np.unique(idx)) == len(idx), f"{name}: Gaussians do not match the source's one to one by position"
    return idx


def quat_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N] |a - b| of unit quaternions up to sign (q and -q are one rotation)."""
    a, b = (torch.nn.functional.normalize(t.double(), dim=-1) for t in (a, b))
    return torch.minimum((a - b).norm(dim=-1), (a + b).norm(dim=-1))


def errors(scene: GaussianScene, ref: GaussianScene, sh_rest: bool = True) -> dict[str, np.ndarray]:
    """Per-Gaussian errors of `scene` against `ref`, Gaussian i against Gaussian i."""
    s, r = scene.to(dtype=torch.float64), ref.to(dtype=torch.float64)
    out = {"means": (s.means - r.means).abs(), "log_scales": (s.log_scales - r.log_scales).abs(),
           "opacity": (s.opacities() - r.opacities()).abs(), "quat": quat_err(s.quats, r.quats),
           "rgb": (s.sh[:, 0] - r.sh[:, 0]).abs() * SH_C0}
    if sh_rest:
        out["sh_rest"] = (s.sh[:, 1:] - r.sh[:, 1:]).abs()
    return {k: v.numpy() for k, v in out.items()}


def compare(scene: GaussianScene, src: GaussianScene, tol: Tol, name: str) -> dict[str, float]:
    """Assert `scene` holds the source's Gaussians (any order) within `tol`; returns the max errors."""
    assert_same_axes(scene, src, name)
    ref = src.subset(match(scene, src, name))
    if tol.sh_rest is None:
        assert scene.sh_degree == 0, f"{name}: SH degree {scene.sh_degree}, the format holds none"
    else:
        assert scene.sh_degree == src.sh_degree, f"{name}: SH degree {scene.sh_degree}, not {src.sh_degree}"
    measured = {}
    for key, err in errors(scene, ref, sh_rest=tol.sh_rest is not None).items():
        bound = np.asarray(getattr(tol, key), np.float64)
        if key == "sh_rest" and bound.ndim == 1:
            bound = bound[None, :, None]
        excess = err - bound
        worst = np.unravel_index(np.argmax(excess), excess.shape)
        assert excess[worst] <= 0, (f"{name}: {key} off by {err[worst]:.3g} at {tuple(int(i) for i in worst)}, "
                                    f"allowed {np.broadcast_to(bound, err.shape)[worst]:.3g}")
        measured[key] = float(err.max())
    return measured


# ---------------------------------------------------------------------------- other tools' files
def test_every_fixture_is_tested_and_small():
    files = {p.name for p in DATA.iterdir() if p.name != "README.md"}
    assert files == set(FIXTURES) | NOT_READ
    assert all((DATA / f).stat().st_size < 1 << 20 for f in files)


@pytest.mark.parametrize("name", FIXTURES)
def test_detect_format(name):
    assert detect_format(DATA / name) == FIXTURES[name][0]


def test_spz_versions():
    """splat-transform writes v4 (NGSP, zstd) by default, v3 (gzip) on request; ours v3."""
    assert [spz_header(DATA / f)[:3] for f in ("st.spz", "st.v3.spz", "ours.spz")] == \
        [(4, 2000, 3), (3, 2000, 3), (3, 2000, 3)]
    assert (DATA / "st.spz").read_bytes()[:4] == b"NGSP" and (DATA / "st.v3.spz").read_bytes()[:2] == b"\x1f\x8b"


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_matches_source(name, source):
    scene, notes = read_scene(DATA / name)
    tol = FIXTURES[name][1](len(scene))
    compare(scene, source, tol, name)
    assert bool(notes) == (FIXTURES[name][0] in ("compressed-ply", "spz", "splat"))


@pytest.mark.parametrize("name", FIXTURES)
def test_scene_load(name):
    scene = GaussianScene.load(DATA / name)
    ref = read_scene(DATA / name)[0]
    assert len(scene) == 2000 and torch.equal(scene.means, ref.means) and torch.equal(scene.sh, ref.sh)


@pytest.mark.parametrize("flip", ["means", "quats", "sh"])
def test_comparison_catches_flips(flip, source):
    """The checks above fail on the y/z flip SPZ files showed before the reader turned RUB to RDF,
    whether in positions, rotations or SH alone (the control for every test of this file)."""
    scene = read_scene(DATA / "st.spz")[0]
    sign = {"means": torch.tensor([1.0, -1, -1]), "quats": torch.tensor([1.0, 1, -1, -1]),
            "sh": torch.tensor([1.0, -1, -1, 1, -1, 1, 1, -1, 1, -1, 1, -1, -1, 1, -1, 1])[:, None]}[flip]
    flipped = GaussianScene(**{k: getattr(scene, k) * (sign if k == flip else 1)
                               for k in ("means", "quats", "log_scales", "opacity_logits", "sh")})
    message = {"means": "axes differ", "quats": "quat off", "sh": "sh_rest off"}[flip]
    with pytest.raises(AssertionError, match=message):
        compare(flipped, source, FIXTURES["st.spz"][1](len(scene)), "st.spz flipped")


# ---------------------------------------------------------------------------- our files, read by splat-transform
@pytest.mark.parametrize("ours, decoded", [("ours.spz", "ours_spz.st.ply"),
                                           ("ours.compressed.ply", "ours_compressed.st.ply"),
                                           ("gsplat.splat", "gsplat_splat.st.ply")])
def test_splat_transform_reads_our_files_as_we_do(ours, decoded):
    """Our file decoded by splat-transform and by us: the same Gaussians in the same order, to
    float32 rounding (two decoders of the same bytes). `.splat` (our writer is gsplat's
    export_splats, byte for byte) differs only where splat-transform decodes rotation bytes as
    b / 255 * 2 - 1 instead of (b - 128) / 128: < 1/128 a component, < 2/128 after renormalising."""
    a, b = read_scene(DATA / ours)[0], read_scene(DATA / decoded)[0]
    err = errors(a, b, sh_rest=a.sh_degree > 0)
    quat_tol = 2 / 128 if ours.endswith(".splat") else SLACK
    for key, e in err.items():
        assert e.max() <= (quat_tol if key == "quat" else SLACK), f"{ours} vs {decoded}: {key} off by {e.max():.3g}"


@pytest.mark.parametrize("ours", ["ours.spz", "ours.compressed.ply"])
def test_our_writer_still_writes_the_files_splat_transform_read(ours, source, tmp_path):
    """The committed `ours.*` (which splat-transform decoded) are what our writer writes today."""
    write_scene(source, tmp_path / ours)
    now, then = read_scene(tmp_path / ours)[0], read_scene(DATA / ours)[0]
    for key, e in errors(now, then).items():
        assert e.max() <= SLACK, f"{ours}: {key} differs from the committed file's by {e.max():.3g}"


def test_spz_is_written_in_rub_axes(source, tmp_path):
    """The SPZ we write holds RUB positions and rotations on disk (read raw, without our reader's turn)."""
    import gsply

    write_scene(source, tmp_path / "s.spz")
    raw = gsply.read_spz(str(tmp_path / "s.spz"))
    assert np.abs(np.asarray(raw.means) - source.means.numpy() * [1, -1, -1]).max() <= 2.0 ** -13 + SLACK
    assert quat_err(torch.from_numpy(np.asarray(raw.quats)), source.quats * torch.tensor([1, 1, -1, -1])).max() \
        <= smallest_three(9, 1 / math.sqrt(2))


# ---------------------------------------------------------------------------- round trips through our own writers
@pytest.mark.parametrize("suffix", [".ply", ".compressed.ply", ".spz", ".splat"])
def test_round_trip(suffix, source, tmp_path):
    path = tmp_path / f"scene{suffix}"
    write_scene(source, path)
    scene, _ = read_scene(path)
    tol = {".ply": lambda: EXACT, ".compressed.ply": lambda: compressed_ply_tol(path, len(scene)),
           ".spz": lambda: spz_tol(path, (8, 8)), ".splat": lambda: splat_tol()}[suffix]()
    compare(scene, source, tol, path.name)


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("content, named", [("gsplat.splat", "scene.spz"), ("gsplat.splat", "scene.ply"),
                                            ("gsplat.splat", "scene.compressed.ply"), ("gsplat.splat", "ckpt.pt")])
def test_suffix_contradicting_content_is_refused(content, named, tmp_path):
    path = tmp_path / named
    shutil.copy(DATA / content, path)
    with pytest.raises(SceneFormatError, match=str(path)):
        read_scene(path)


def test_recognised_signature_wins_over_suffix(tmp_path):
    """Content with a signature is read as what it is, whatever its name (only a suffix whose format
    has a signature the file lacks is an error)."""
    path = tmp_path / "scene.ply"
    shutil.copy(DATA / "st.spz", path)
    assert detect_format(path) == "spz"


def test_truncated_splat_is_refused(tmp_path):
    path = tmp_path / "cut.splat"
    path.write_bytes((DATA / "gsplat.splat").read_bytes()[:-5])
    with pytest.raises(SceneFormatError, match=rf"{path}: {2000 * 32 - 5} bytes is not a whole number of 32-byte"):
        read_scene(path)


def test_sog_is_detected_and_needs_its_webp_decoder():
    """splat-transform's SOG (a zip of WebP images) is told from a torch checkpoint (also a zip); it is
    read only where gsply's WebP decoder (imagecodecs) is installed, else an error says so."""
    assert detect_format(DATA / "st.sog") == "sog" and detect_format(DATA / "ckpt_99_rank0.pt") == "gsplat-ckpt"
    try:
        import imagecodecs  # noqa: F401
    except ImportError:
        with pytest.raises(SceneFormatError, match=str(DATA / "st.sog") + ": a SOG file needs `pip install imagecodecs`"):
            read_scene(DATA / "st.sog")
    else:
        assert len(read_scene(DATA / "st.sog")[0]) == 2000
