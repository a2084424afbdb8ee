"""Every scene reader under damaged input (hypothesis): truncation, flipped bytes, absurd counts,
wrong magic bytes, NaN / Inf, zero rotations. The result is a scene with finite values or one
SceneFormatError naming the file; never another exception, never an allocation from a claimed count."""

import re
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gendistill.core.formats import read_scene
from gendistill.core.scene import GaussianScene, SceneFormatError

EXAMPLES = 40
SUFFIX = {"ply": ".ply", "ascii-ply": ".ply", "compressed-ply": ".compressed.ply", "spz": ".spz", "splat": ".splat",
          "gsplat-ckpt": ".pt"}
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _scene(n=300):
    g = torch.Generator().manual_seed(0)
    return GaussianScene(means=torch.randn(n, 3, generator=g), quats=torch.randn(n, 4, generator=g),
                         log_scales=torch.randn(n, 3, generator=g) - 3, opacity_logits=torch.randn(n, generator=g),
                         sh=torch.randn(n, 4, 3, generator=g) * 0.3)


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """format -> bytes of a valid file of that format."""
    from plyfile import PlyData

    folder, scene, out = tmp_path_factory.mktemp("originals"), _scene(), {}
    for fmt, suffix in SUFFIX.items():
        path = folder / f"scene{suffix}"
        if fmt == "gsplat-ckpt":
            torch.save({"step": 9, "splats": {"means": scene.means, "quats": scene.quats, "scales": scene.log_scales,
                                              "opacities": scene.opacity_logits, "sh0": scene.sh[:, :1],
                                              "shN": scene.sh[:, 1:]}}, path)
        elif fmt == "ascii-ply":
            scene.save_ply(path)
            ply = PlyData.read(str(path), mmap=False)  # a mapped file must not be rewritten in place
            ply.text = True
            ply.write(str(path))
        else:
            scene.save(path)
        out[fmt] = path.read_bytes()
        read_scene(path)  # compiles gsply's numba kernels now, not under tracemalloc (minutes there)
    return out


def _read_checked(path, max_bytes=None):
    """Read `path`: a scene with finite values, or a SceneFormatError naming it; with `max_bytes`,
    traced allocations stay under it (numpy allocations are traced)."""
    if max_bytes:
        tracemalloc.start()
    try:
        scene, _ = read_scene(path)
    except SceneFormatError as err:
        assert str(path) in str(err), err
        return None
    finally:
        if max_bytes:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak < max_bytes, f"{peak / 2**20:.0f} MiB allocated reading a {path.stat().st_size}-byte file"
    for name in ("means", "quats", "log_scales", "opacity_logits", "sh"):
        assert torch.isfinite(getattr(scene, name)).all(), name
    assert (scene.quats.norm(dim=1) > 0).all()
    return scene


def _damage(data: bytes, cut: int | None, flips: list[tuple[int, int]], magic: bytes | None) -> bytes:
    b = bytearray(data[:cut] if cut is not None else data)
    for pos, value in flips:
        if b:
            b[pos % len(b)] = value
    if magic is not None:
        b[: len(magic)] = magic
    return bytes(b)


@pytest.mark.parametrize("fmt", list(SUFFIX))
@FUZZ
@given(cut=st.one_of(st.none(), st.integers(0, 20_000)),
       flips=st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), max_size=6),
       magic=st.one_of(st.none(), st.binary(min_size=1, max_size=8)))
def test_damaged_files_give_a_scene_or_one_clear_error(originals, tmp_path, fmt, cut, flips, magic):
    path = tmp_path / f"damaged{SUFFIX[fmt]}"
    path.write_bytes(_damage(originals[fmt], cut, flips, magic))
    _read_checked(path)


@pytest.mark.parametrize("fmt", ["ply", "ascii-ply", "compressed-ply"])
@FUZZ
@given(count=st.integers(0, 2**63 - 1))
def test_absurd_counts_are_refused_before_any_allocation(originals, tmp_path, fmt, count):
    path = tmp_path / f"counted{SUFFIX[fmt]}"
    path.write_bytes(re.sub(rb"element vertex \d+", b"element vertex %d" % count, originals[fmt], count=1))
    _read_checked(path, max_bytes=64 * 2**20)


def test_nan_inf_and_zero_rotations(tmp_path):
    scene = _scene(20)
    scene.quats[3] = 0
    scene.save_ply(tmp_path / "zero.ply")
    loaded, notes = read_scene(tmp_path / "zero.ply")
    assert notes == ["1 zero rotation(s) read as the identity"]
    assert loaded.quats[3].tolist() == [1, 0, 0, 0] and torch.equal(loaded.quats[4], scene.quats[4])
    raw = bytearray((tmp_path / "zero.ply").read_bytes())
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    row = 4 * raw[:end].count(b"property float")  # bytes a Gaussian
    raw[end + row + 12: end + row + 16] = np.float32(np.nan).tobytes()  # row 1, nx: never read
    raw[end + row: end + row + 4] = np.float32(np.inf).tobytes()  # row 1, x
    (tmp_path / "bad.ply").write_bytes(bytes(raw))
    with pytest.raises(SceneFormatError, match=r"bad.ply: property 'x' has 1 NaN/Inf value"):
        read_scene(tmp_path / "bad.ply")
