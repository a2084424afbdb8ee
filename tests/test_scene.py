"""GaussianScene: INRIA PLY round trips and compatibility, bad input, initialisation, real data."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement

from gendistill.core.render.sh import SH_C0
from gendistill.core.scene import GaussianScene, SceneFormatError

ROOT = Path(__file__).resolve().parents[1]
INRIA_ORDER = lambda k_rest: (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]  # noqa: E731
                              + [f"f_rest_{i}" for i in range(k_rest)]
                              + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


def random_scene(n=50, degree=1, label_degree=None, certainty=False, extras=False, seed=0) -> GaussianScene:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return GaussianScene(
        means=r(n, 3), quats=r(n, 4), log_scales=r(n, 3), opacity_logits=r(n), sh=r(n, (degree + 1) ** 2, 3),
        label_sh=None if label_degree is None else r(n, (label_degree + 1) ** 2, 3),
        certainty=r(n) if certainty else None,
        extras={"part": torch.randint(0, 7, (n,), generator=g, dtype=torch.int32),
                "weight": r(n).double(), "flag": (r(n) > 0).to(torch.uint8)} if extras else {},
        comments=["part_names: body head", "hello world"] if extras else [],
    )


def assert_same(a: GaussianScene, b: GaussianScene):
    for name in ("means", "quats", "log_scales", "opacity_logits", "sh", "label_sh", "certainty"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name
    assert a.extras.keys() == b.extras.keys()
    for k in a.extras:
        assert torch.equal(a.extras[k].to(b.extras[k].dtype), b.extras[k]), k
    assert a.comments == b.comments


def write_inria_style(path, arrays: dict, comments=(), text=False):
    """What INRIA's GaussianModel.save_ply does: a structured f4 array, one 'vertex' element."""
    n = len(next(iter(arrays.values())))
    data = np.empty(n, dtype=[(k, "f4") for k in arrays])
    for k, v in arrays.items():
        data[k] = v
    PlyData([PlyElement.describe(data, "vertex")], text=text, comments=list(comments)).write(str(path))


def inria_arrays(n=20, degree=2, normals=True, seed=1):
    rng = np.random.default_rng(seed)
    k_rest = 3 * ((degree + 1) ** 2 - 1)
    names = INRIA_ORDER(k_rest)
    if not normals:
        names = [x for x in names if x not in ("nx", "ny", "nz")]
    return {k: rng.normal(size=n).astype(np.float32) for k in names}


# ---------------------------------------------------------------------- round trips
@pytest.mark.parametrize("degree", [0, 1, 2, 3])
@pytest.mark.parametrize("full", [False, True])
def test_round_trip_exact(tmp_path, degree, full):
    scene = random_scene(degree=degree, label_degree=(3 - degree) if full else None, certainty=full, extras=full)
    path = scene.save_ply(tmp_path / "s.ply")
    back = GaussianScene.load_ply(path)
    assert_same(scene, back)
    assert back.sh_degree == degree
    if full:
        assert back.extras["part"].dtype == torch.int32 and back.extras["flag"].dtype == torch.uint8
        assert back.extras["weight"].dtype == torch.float64
        assert back.metadata()["part_names"] == "body head"


def test_our_file_is_inria_layout(tmp_path):
    scene = random_scene(degree=3, label_degree=0, certainty=True, extras=True)
    scene.save_ply(tmp_path / "s.ply")
    ply = PlyData.read(str(tmp_path / "s.ply"))
    assert [el.name for el in ply.elements] == ["vertex"] and ply.byte_order == "<" and not ply.text
    names = [p.name for p in ply["vertex"].properties]
    assert names[:62] == INRIA_ORDER(45)
    assert names[62:] == ["obj_dc_0", "obj_dc_1", "obj_dc_2", "certainty", "part", "weight", "flag"]
    assert all(ply["vertex"].data.dtype[k] == np.dtype("<f4") for k in names[:66])
    v = ply["vertex"]
    assert np.all(v["nx"] == 0)
    # channel-major f_rest: f_rest_{c * 15 + (k - 1)} is sh[:, k, c]
    for c in range(3):
        for k in range(1, 16):
            np.testing.assert_array_equal(v[f"f_rest_{c * 15 + k - 1}"], scene.sh[:, k, c].numpy())
    np.testing.assert_array_equal(v["rot_0"], scene.quats[:, 0].numpy())  # w first
    np.testing.assert_array_equal(v["opacity"], scene.opacity_logits.numpy())
    assert "part_names: body head" in ply.comments


def test_inria_written_file_loads(tmp_path):
    arr = inria_arrays(degree=2)
    write_inria_style(tmp_path / "point_cloud.ply", arr)
    s = GaussianScene.load_ply(tmp_path / "point_cloud.ply")
    assert s.sh_degree == 2 and len(s) == 20 and s.extras == {} and s.label_sh is None
    np.testing.assert_array_equal(s.means[:, 1].numpy(), arr["y"])
    np.testing.assert_array_equal(s.sh[:, 0, 2].numpy(), arr["f_dc_2"])
    np.testing.assert_array_equal(s.sh[:, 3, 1].numpy(), arr["f_rest_10"])  # G channel (8 each), coeff 3
    np.testing.assert_array_equal(s.sh[:, 8, 2].numpy(), arr["f_rest_23"])
    np.testing.assert_array_equal(s.quats[:, 3].numpy(), arr["rot_3"])
    np.testing.assert_array_equal(s.log_scales[:, 0].numpy(), arr["scale_0"])
    scales = np.stack([arr[f"scale_{i}"] for i in range(3)], 1)
    np.testing.assert_allclose(s.scales().numpy(), np.exp(scales), rtol=1e-6)
    np.testing.assert_allclose(s.opacities().numpy(), 1 / (1 + np.exp(-arr["opacity"])), rtol=1e-6)
    np.testing.assert_allclose(s.normalized_quats().norm(dim=-1).numpy(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(s.colors_rgb()[:, 0].numpy(), np.clip(arr["f_dc_0"] * SH_C0 + 0.5, 0, 1), rtol=1e-6)


def test_no_normals_and_gsplat_exporter(tmp_path):
    arr = inria_arrays(degree=1, normals=False)
    write_inria_style(tmp_path / "a.ply", arr)
    s = GaussianScene.load_ply(tmp_path / "a.ply")
    np.testing.assert_array_equal(s.sh[:, 1, 0].numpy(), arr["f_rest_0"])
    from gsplat.exporter import splat2ply_bytes

    sh0 = s.sh[:, 0]
    shn = s.sh[:, 1:].transpose(1, 2).reshape(len(s), -1)  # gsplat's trainer exports channel-major
    (tmp_path / "g.ply").write_bytes(splat2ply_bytes(s.means, s.log_scales, s.quats, s.opacity_logits, sh0, shn))
    assert_same(GaussianScene.load_ply(tmp_path / "g.ply"), s)


def test_ascii_ply(tmp_path):
    arr = inria_arrays(n=5, degree=0)
    write_inria_style(tmp_path / "a.ply", arr, text=True, comments=["made by hand"])
    s = GaussianScene.load_ply(tmp_path / "a.ply")
    np.testing.assert_allclose(s.means[:, 0].numpy(), arr["x"], rtol=1e-6)
    assert s.sh_degree == 0 and s.comments == ["made by hand"]


def test_romap_label_field(tmp_path):
    arr = inria_arrays(n=8, degree=0)
    rng = np.random.default_rng(3)
    arr |= {f"obj_dc_{i}": rng.normal(size=8).astype(np.float32) for i in range(3)}
    arr |= {f"obj_rest_{i}": rng.normal(size=8).astype(np.float32) for i in range(9)}
    arr["certainty"] = rng.uniform(size=8).astype(np.float32)
    write_inria_style(tmp_path / "r.ply", arr)
    s = GaussianScene.load_ply(tmp_path / "r.ply")
    assert s.label_sh_degree == 1 and s.sh_degree == 0
    np.testing.assert_array_equal(s.label_sh[:, 2, 1].numpy(), arr["obj_rest_4"])  # G channel, coeff 2
    np.testing.assert_array_equal(s.certainty.numpy(), arr["certainty"])


# ---------------------------------------------------------------------- bad input
def _bad_files(tmp_path):
    good = tmp_path / "good.ply"
    random_scene(n=30).save_ply(good)
    raw = good.read_bytes()
    cases = {}
    (tmp_path / "trunc.ply").write_bytes(raw[:-50])
    cases["trunc.ply"] = "truncated"
    (tmp_path / "text.ply").write_text("hello, this is not a ply\n")
    cases["text.ply"] = "not a PLY"
    arr = inria_arrays(n=4, degree=0)
    write_inria_style(tmp_path / "nox.ply", {k: v for k, v in arr.items() if k != "x"})
    cases["nox.ply"] = "'x' is missing"
    write_inria_style(tmp_path / "norot.ply", {k: v for k, v in arr.items() if k != "rot_2"})
    cases["norot.ply"] = "'rot_2' is missing"
    nan = dict(arr, opacity=np.array([0, np.nan, 1, 2], np.float32))
    write_inria_style(tmp_path / "nan.ply", nan)
    cases["nan.ply"] = "'opacity' has 1 NaN/Inf"
    inf = dict(arr, scale_1=np.array([0, np.inf, 1, 2], np.float32))
    write_inria_style(tmp_path / "inf.ply", inf)
    cases["inf.ply"] = "'scale_1' has 1 NaN/Inf"
    write_inria_style(tmp_path / "sh6.ply", arr | {f"f_rest_{i}": arr["x"] for i in range(6)})
    cases["sh6.ply"] = "6 f_rest_"
    (tmp_path / "face.ply").write_text("ply\nformat ascii 1.0\nelement face 1\n"
                                       "property list uchar int vertex_indices\nend_header\n3 0 1 2\n")
    cases["face.ply"] = "no 'vertex' element"
    return cases


def test_bad_input_errors(tmp_path):
    for name, msg in _bad_files(tmp_path).items():
        with pytest.raises(SceneFormatError) as e:
            GaussianScene.load_ply(tmp_path / name)
        assert str(tmp_path / name) in str(e.value) and msg in str(e.value), (name, str(e.value))
    with pytest.raises(FileNotFoundError, match="missing.ply"):
        GaussianScene.load_ply(tmp_path / "missing.ply")


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "out.ply"
    random_scene(n=10, seed=1).save_ply(target)
    before = target.read_bytes()

    def broken_write(self, stream):
        Path(stream).write_bytes(b"ply\nformat binary_little_endian 1.0\n")  # half a file, then a crash
        raise OSError("disk full")

    monkeypatch.setattr(PlyData, "write", broken_write)
    with pytest.raises(OSError, match="disk full"):
        random_scene(n=10, seed=2).save_ply(target)
    with pytest.raises(OSError):
        random_scene(n=10, seed=2).save_ply(tmp_path / "new.ply")
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.ply"]


def test_non_finite_values_are_never_written(tmp_path):
    """save_ply refuses what load_ply would reject, and leaves an existing file as it was."""
    target = tmp_path / "out.ply"
    random_scene(n=10, seed=1).save_ply(target)
    before = target.read_bytes()
    bad = random_scene(n=10, seed=2)
    bad.means[3, 1] = float("nan")
    bad.sh[5, 0, 2] = float("inf")
    with pytest.raises(ValueError, match=r"NaN/inf values in y \(1\), f_dc_2 \(1\)"):
        bad.save_ply(target)
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["out.ply"]


def test_invalid_construction():
    s = random_scene(n=4)
    with pytest.raises(ValueError, match="quats"):
        GaussianScene(s.means, s.quats[:, :3], s.log_scales, s.opacity_logits, s.sh)
    with pytest.raises(ValueError, match="SH"):
        GaussianScene(s.means, s.quats, s.log_scales, s.opacity_logits, torch.zeros(4, 5, 3))
    with pytest.raises(ValueError, match="extra property 'part'"):
        GaussianScene(s.means, s.quats, s.log_scales, s.opacity_logits, s.sh, extras={"part": torch.zeros(3)})


# ---------------------------------------------------------------------- construction and editing
def test_from_points_grid():
    d = 0.25  # a 3x3x3 grid: every point has at least 3 neighbours at exactly d
    g = torch.stack(torch.meshgrid(*[torch.arange(3.0) * d] * 3, indexing="ij"), -1).reshape(-1, 3)
    s = GaussianScene.from_points(g + torch.tensor([1.0, -2.0, 0.5]), torch.full((27, 3), 255, dtype=torch.uint8))
    torch.testing.assert_close(s.log_scales, torch.full((27, 3), math.log(d)))
    assert s.sh.shape == (27, 16, 3) and s.sh[:, 1:].abs().max() == 0
    torch.testing.assert_close(s.colors_rgb(), torch.ones(27, 3))
    torch.testing.assert_close(s.opacities(), torch.full((27,), 0.1))
    assert torch.equal(s.quats, torch.tensor([[1.0, 0, 0, 0]]).repeat(27, 1))


def test_from_points_rms_of_three_neighbours():
    x = torch.tensor([0.0, 1.0, 3.0, 6.0, 10.0])
    pts = torch.stack([x, torch.zeros(5), torch.zeros(5)], -1)
    s = GaussianScene.from_points(pts, np.full((5, 3), 0.25, np.float32), sh_degree=0, init_opacity=0.5)
    nn = {0: [1, 3, 6], 1: [1, 2, 5], 3: [2, 3, 3], 6: [3, 4, 5], 10: [4, 7, 9]}  # 3-NN distances by hand
    want = torch.tensor([math.log(math.sqrt(sum(v * v for v in nn[int(p)]) / 3)) for p in x])
    torch.testing.assert_close(s.log_scales[:, 0], want)
    torch.testing.assert_close(s.colors_rgb(), torch.full((5, 3), 0.25))
    assert s.sh.shape == (5, 1, 3) and torch.allclose(s.opacity_logits, torch.zeros(5))
    with pytest.raises(ValueError, match="at least 2"):
        GaussianScene.from_points(pts[:1])


def test_subset_concat_and_views():
    a = random_scene(n=10, degree=1, extras=True, seed=1)
    b = random_scene(n=6, degree=3, extras=True, seed=2)
    mask = a.extras["part"] > 3
    sa = a.subset(mask)
    assert len(sa) == int(mask.sum()) and torch.equal(sa.means, a.means[mask])
    assert torch.equal(sa.extras["part"], a.extras["part"][mask]) and sa.comments == a.comments
    si = a.subset([9, 0])
    assert torch.equal(si.sh, a.sh[[9, 0]]) and torch.equal(si.extras["weight"], a.extras["weight"][[9, 0]])
    c = GaussianScene.concat([a, b])
    assert len(c) == 16 and c.sh_degree == 3
    assert torch.equal(c.sh[:10, :4], a.sh) and c.sh[:10, 4:].abs().max() == 0 and torch.equal(c.sh[10:], b.sh)
    assert torch.equal(c.extras["part"], torch.cat([a.extras["part"], b.extras["part"]]))
    with pytest.raises(ValueError, match="extras differ"):
        GaussianScene.concat([a, random_scene(n=3)])
    with pytest.raises(ValueError, match="certainty"):
        GaussianScene.concat([random_scene(n=3, certainty=True), random_scene(n=3)])
    lo, hi = c.bbox()
    torch.testing.assert_close(lo, c.means.min(0).values)
    torch.testing.assert_close(c.center(), (c.means.min(0).values + c.means.max(0).values) / 2)
    args = c.render_args()
    assert list(args) == ["means", "quats", "scales", "opacities", "colors", "sh_degree"] and args["sh_degree"] == 3
    torch.testing.assert_close(args["scales"], c.log_scales.exp())
    d = c.to(dtype=torch.float64)
    assert d.means.dtype == torch.float64 and d.extras["part"].dtype == torch.int32


def test_demo_asset():
    path = ROOT / "assets" / "scenes" / "snowman.ply"
    assert path.stat().st_size < 2_000_000
    s = GaussianScene.load_ply(path)
    assert 12_000 <= len(s) <= 18_000 and s.sh_degree in (0, 1)
    names = s.metadata()["part_names"].split()
    assert names == ["body", "head", "nose", "hat"]
    counts = torch.bincount(s.extras["part"].long(), minlength=4)
    assert len(counts) == 4 and counts.min() > 1000
    nose = s.subset(s.extras["part"] == 2).colors_rgb().mean(0)
    hat = s.subset(s.extras["part"] == 3).colors_rgb().mean(0)
    assert nose[0] > 0.7 and nose[2] < 0.3 and hat.max() < 0.25  # orange nose, dark hat
    lo, hi = s.bbox()
    assert lo[2] >= 0 and hi[2] > 1.5  # z-up, standing on z = 0


# ---------------------------------------------------------------------- real data
def _zbuffer_points(points, colors, viewmat, K, w, h):
    """Independent reference: nearest coloured point per pixel, [h, w, 3] and a coverage mask."""
    pc = points @ viewmat[:3, :3].T + viewmat[:3, 3]
    z = pc[:, 2]
    ok = z > 0.01
    uv = (pc[ok] @ K.T)
    u = np.floor(uv[:, 0] / uv[:, 2]).astype(int)
    v = np.floor(uv[:, 1] / uv[:, 2]).astype(int)
    col, z = colors[ok], z[ok]
    inb = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    u, v, col, z = u[inb], v[inb], col[inb], z[inb]
    order = np.argsort(-z)  # far first; nearer points overwrite
    img = np.zeros((h, w, 3), np.float32)
    cov = np.zeros((h, w), bool)
    img[v[order], u[order]] = col[order]
    cov[v[order], u[order]] = True
    return img, cov


def _pool(img, mask, k=3):
    """Masked k x k box mean: ([h/k, w/k, 3], [h/k, w/k] any-covered)."""
    h, w = mask.shape[0] // k * k, mask.shape[1] // k * k
    s = (img * mask[..., None])[:h, :w].reshape(h // k, k, w // k, k, 3).sum((1, 3))
    c = mask[:h, :w].reshape(h // k, k, w // k, k).sum((1, 3))
    return s / np.maximum(c, 1)[..., None], c > 0


def test_garden_render_matches_point_projection(garden_points):
    from gendistill.core.render import rasterize
    from gendistill.core.cameras import Cameras

    path, min_cover = garden_points
    with np.load(path) as z:
        pts, cols = z["means3d"], z["colors"]
        cams = Cameras(torch.from_numpy(z["viewmats"]).float(), torch.from_numpy(z["Ks"]).float(),
                       int(z["width"]), int(z["height"]))
    small = cams[0].scaled(0.25)
    assert (small.width, small.height) == (162, 105)
    scene = GaussianScene.from_points(pts, cols, sh_degree=0)  # 3DGS init, opacity 0.1
    img, alpha, _ = rasterize(**scene.render_args(), viewmats=small.viewmats, Ks=small.Ks,
                              width=small.width, height=small.height)  # auto: the compiled cpu backend
    assert img.shape == (1, 105, 162, 3) and alpha.mean() > 0.5
    img = img[0].numpy()
    ref, cov = _zbuffer_points(pts, cols.astype(np.float32) / 255, small.viewmats[0].numpy(),
                               small.Ks[0].numpy(), small.width, small.height)
    assert cov.mean() > min_cover
    ref, cov = _pool(ref, cov)

    def corr(x):
        x, _ = _pool(np.ascontiguousarray(x), np.ones(x.shape[:2], bool))
        return float(np.corrcoef(x[cov].ravel(), ref[cov].ravel())[0, 1])

    good = corr(img)  # about 0.71 (sample), 0.73 (all points)
    assert good > 0.6, good
    assert corr(img[::-1]) < good - 0.3  # upside down (an OpenGL camera taken as OpenCV) fails
    assert corr(img[:, ::-1]) < good - 0.2  # mirrored fails
    assert corr(img[..., ::-1]) < good - 0.15  # swapped colour channels fail
