"""rasterize(): backends "torch" and "cpu" against the brute-force float64 oracle, gradients, meta,
backend selection, input errors, and (CUDA only) parity of the torch backend with gsplat."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from gendistill.core.render import BACKENDS, RenderBackend, project_gaussians, rasterize, select_backend
from gendistill.core.render import torch_backend

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from render_reference import reference_composite, reference_rasterize  # noqa: E402

BACKEND_NAMES = ["torch", "cpu"]


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, -1.0, 0.0)) -> torch.Tensor:
    """World-to-camera [4, 4] (OpenCV: +z forward, +y down) for a camera at `eye` facing `target`."""
    eye, target, up = (torch.tensor(v, dtype=torch.float64) for v in (eye, target, up))
    z = torch.nn.functional.normalize(target - eye, dim=0)
    x = torch.nn.functional.normalize(torch.linalg.cross(up, z), dim=0)
    y = torch.linalg.cross(z, x)
    rot = torch.stack([x, y, z])  # rows: camera axes in world coordinates
    view = torch.eye(4, dtype=torch.float64)
    view[:3, :3] = rot
    view[:3, 3] = -rot @ eye
    return view


def make_scene(seed=0, n=48, n_cams=2, width=37, height=29, sh_degree=None, n_channels=3, sh_bases=None,
               dtype=torch.float64):  # fmt: skip
    """Random Gaussians seen by `n_cams` cameras, with the awkward cases planted in camera 0:
    behind the camera, across the near plane, on the image borders, near-transparent, very
    anisotropic, tiny (eps2d-dominated), opaque ones (alpha capped at 0.999, pixels that end)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    nrm = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    views = [look_at((4.0 * math.sin(a), 0.3 * i, -4.0 * math.cos(a))) for i, a in enumerate(np.linspace(0, 0.9, n_cams))]
    viewmats = torch.stack(views)
    f = 0.9 * width
    ks = torch.tensor([[f, 0.0, width / 2 + 0.7], [0.0, 1.05 * f, height / 2 - 0.4], [0.0, 0.0, 1.0]], dtype=torch.float64)
    ks = ks.expand(n_cams, 3, 3).clone()
    ks[1:, 0, 2] += 1.5

    means = nrm(n, 3) * 0.8
    scales = torch.exp(nrm(n, 3) * 0.5) * 0.12
    quats = nrm(n, 4)
    opacities = rnd(n) * 0.9 + 0.05
    cam_to_world = torch.linalg.inv(viewmats[0])

    def at_pixel(u, v, z):  # world point that camera 0 sees at pixel (u, v), depth z
        x = torch.tensor([(u - ks[0, 0, 2]) / ks[0, 0, 0] * z, (v - ks[0, 1, 2]) / ks[0, 1, 1] * z, z, 1.0])
        return (cam_to_world @ x.double())[:3]

    if n >= 15:  # plant the awkward cases
        means[0] = at_pixel(10, 10, -1.0)  # behind the camera
        means[1] = at_pixel(15, 12, 0.005)  # in front of the camera but before the near plane
        means[2], means[3] = at_pixel(-1.5, 9, 3.0), at_pixel(width + 1.0, height - 3, 3.5)  # borders
        means[4] = at_pixel(20, -2.0, 2.5)
        opacities[5], opacities[6], opacities[7] = 0.0035, 0.0045, 0.012  # culled, tiny box, faint
        scales[8] = torch.tensor([0.9, 0.004, 0.03])  # needle
        scales[9] = torch.tensor([1e-4, 1e-4, 1e-4])  # below a pixel: eps2d makes it visible
        for i, u in zip(range(10, 14), (8, 14, 20, 26)):  # opaque layers: alpha capped, pixels end
            means[i] = at_pixel(u + 0.5, 14.5, 2.0 + 0.2 * (i - 10))  # on a pixel centre
            scales[i] = torch.tensor([0.6, 0.5, 0.4])
            opacities[i] = 0.9999 if i % 2 == 0 else 0.98
        means[14] = at_pixel(-0.3 * width, 10, 3.3)  # beyond 1.3x the FOV: clamped Jacobian
        scales[14] = torch.tensor([1.2, 1.0, 1.1])

    if sh_degree is None:
        colors = rnd(n, n_channels)
        n_out = n_channels
    else:
        colors = nrm(n, sh_bases or (sh_degree + 1) ** 2, 3) * 0.4
        n_out = 3
    backgrounds = rnd(n_cams, n_out)
    scene = dict(means=means, quats=quats, scales=scales, opacities=opacities, colors=colors,
                 viewmats=viewmats, Ks=ks, backgrounds=backgrounds)  # fmt: skip
    scene = {k: v.to(dtype) for k, v in scene.items()}
    return scene, dict(width=width, height=height, sh_degree=sh_degree)


def call(scene, cfg, **kw):
    s = dict(scene)
    args = [s.pop(k) for k in ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks")]
    return rasterize(*args, cfg["width"], cfg["height"], sh_degree=cfg["sh_degree"], **{**s, **kw})


def call_reference(scene, cfg, **kw):
    s = dict(scene)
    args = [s.pop(k) for k in ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks")]
    return reference_rasterize(*args, cfg["width"], cfg["height"], sh_degree=cfg["sh_degree"], **{**s, **kw})


CASES = {  # name: (make_scene kwargs, rasterize kwargs)
    "rgb": (dict(seed=0), dict(render_mode="RGB")),
    "rgb-no-background": (dict(seed=1), dict(render_mode="RGB", backgrounds=None)),
    "features7": (dict(seed=2, n_channels=7), dict(render_mode="RGB")),
    "sh0-rgb+d": (dict(seed=3, sh_degree=0), dict(render_mode="RGB+D")),
    "sh1-rgb+ed": (dict(seed=4, sh_degree=1), dict(render_mode="RGB+ED")),
    "sh2-of-3-d": (dict(seed=5, sh_degree=2, sh_bases=16), dict(render_mode="D")),
    "sh3-ed": (dict(seed=6, sh_degree=3), dict(render_mode="ED")),
    "three-cameras-tile8": (dict(seed=7, n_cams=3, n=60), dict(tile_size=8)),
    "dense-one-camera": (dict(seed=8, n_cams=1, n=150, width=33, height=17), dict(render_mode="RGB+ED")),
    "planes-eps-clip": (dict(seed=10, n=60), dict(near_plane=3.0, far_plane=4.5, eps2d=0.1, radius_clip=1.0)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_matches_reference_float64(backend, case):
    scene_kw, kw = CASES[case]
    scene, cfg = make_scene(**scene_kw)
    render, alphas, meta = call(scene, cfg, backend=backend, **kw)
    ref_render, ref_alphas, ref = call_reference(scene, cfg, **kw)
    assert render.dtype == torch.float64 and render.shape == ref_render.shape
    np.testing.assert_array_equal(meta["radii"].numpy(), ref["radii"])
    for key in ("means2d", "depths", "conics"):
        np.testing.assert_allclose(meta[key].detach().numpy(), ref[key], rtol=1e-9, atol=1e-9, err_msg=key)
    assert np.abs(render.detach().numpy() - ref_render).max() < 1e-6
    assert np.abs(alphas.detach().numpy() - ref_alphas).max() < 1e-6


def test_scenes_exercise_the_awkward_cases():
    scene, cfg = make_scene(seed=0)
    stats = {}
    call_reference(scene, cfg, stats=stats)
    radii = project_gaussians(*(scene[k] for k in ("means", "quats", "scales", "opacities", "viewmats", "Ks")),
                              cfg["width"], cfg["height"])[0]  # fmt: skip
    visible = (radii[0] > 0).all(-1)
    assert not visible[0] and not visible[1] and not visible[5]  # behind, before near plane, transparent
    assert visible[2:5].all() and visible[6] and visible[8:15].all()
    assert stats["ended_pixels"] > 0 and stats["capped_fragments"] > 0 and stats["skipped_fragments"] > 0


def test_projection_gradients_match_finite_differences():
    scene, cfg = make_scene(seed=19, n=16, n_cams=2)
    names = ("means", "quats", "scales", "viewmats", "Ks")
    radii = project_gaussians(*(scene[k] for k in ("means", "quats", "scales", "opacities", "viewmats", "Ks")),
                              cfg["width"], cfg["height"])[0]  # fmt: skip
    assert (radii > 0).all(-1).sum() > 20

    def f(means, quats, scales, viewmats, ks):
        _, means2d, depths, conics = project_gaussians(means, quats, scales, scene["opacities"], viewmats, ks,
                                                       cfg["width"], cfg["height"])  # fmt: skip
        return means2d, depths, conics

    inputs = [scene[k].clone().requires_grad_() for k in names]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_small_blocks_and_batches_match(monkeypatch):
    """Block, chunk and tile-batch boundaries (tiny sizes here) do not change the image."""
    monkeypatch.setattr(torch_backend, "BLOCK", 3)
    monkeypatch.setattr(torch_backend, "CHUNK_BLOCKS", 2)
    monkeypatch.setattr(torch_backend, "PIXEL_BUDGET", 2 * 64 * 3)
    scene, cfg = make_scene(seed=8, n_cams=1, n=150, width=33, height=17)
    render, alphas, _ = call(scene, cfg, backend="torch", tile_size=8, render_mode="RGB+D")
    ref_render, ref_alphas, _ = call_reference(scene, cfg, tile_size=8, render_mode="RGB+D")
    assert np.abs(render.numpy() - ref_render).max() < 1e-6
    assert np.abs(alphas.numpy() - ref_alphas).max() < 1e-6


@pytest.mark.parametrize("small_blocks", [False, True])
@pytest.mark.parametrize("case", ["rgb", "three-cameras-tile8", "dense-one-camera"])
def test_pixel_votes_count_composited_pixels(case, small_blocks, monkeypatch):
    """Per Gaussian, the pixels it composites into (GaussianEditor's votes, with the values summed there)
    and the pixels it ends."""
    if small_blocks:
        monkeypatch.setattr(torch_backend, "BLOCK", 3)
        monkeypatch.setattr(torch_backend, "PIXEL_BUDGET", 2 * 64 * 3)
    scene_kw, kw = CASES[case]
    scene, cfg = make_scene(**scene_kw)
    w, h, ts = cfg["width"], cfg["height"], kw.get("tile_size", 16)
    radii, means2d, depths, conics = project_gaussians(scene["means"], scene["quats"], scene["scales"],
                                                       scene["opacities"], scene["viewmats"], scene["Ks"], w, h)
    opac = scene["opacities"][None].expand(len(depths), -1)
    values = torch.rand(len(depths), h, w, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    counts, ends, sums = torch_backend.pixel_votes(means2d, conics, opac, depths, radii, w, h, values, ts)
    stats = {"values": values.numpy()}
    reference_composite(means2d.numpy(), conics.numpy(), scene["colors"].numpy()[None].repeat(len(depths), 0),
                        opac.numpy(), depths.numpy(), radii.numpy(), w, h, tile_size=ts, stats=stats)
    assert stats["counts"].sum() > 50
    np.testing.assert_array_equal(counts.numpy(), stats["counts"])
    np.testing.assert_array_equal(ends.numpy(), stats["ends"])
    np.testing.assert_allclose(sums.numpy(), stats["sums"], atol=1e-9)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_compositor_skips_indefinite_conics(backend):
    """sigma < 0 fragments (only possible for conics not from the projection) are skipped."""
    fn = _compositor(backend)
    g = torch.Generator().manual_seed(0)
    n, w, h = 12, 20, 18
    means2d = torch.rand(1, n, 2, generator=g, dtype=torch.float64) * torch.tensor([w, h])
    conics = torch.rand(1, n, 3, generator=g, dtype=torch.float64) * 0.3 + 0.05
    conics[0, :4, 1] = 0.5  # b^2 > a c: indefinite
    colors = torch.rand(1, n, 3, generator=g, dtype=torch.float64)
    opac = torch.rand(1, n, generator=g, dtype=torch.float64)
    depths = torch.rand(1, n, generator=g, dtype=torch.float64) + 1
    radii = torch.full((1, n, 2), 6, dtype=torch.int32)
    bg = torch.rand(1, 3, generator=g, dtype=torch.float64)
    render, alphas = fn(means2d, conics, colors, opac, depths, radii, w, h, bg, 16)
    ref_render, ref_alphas = reference_composite(means2d.numpy(), conics.numpy(), colors.numpy(), opac.numpy(),
                                                 depths.numpy(), radii.numpy(), w, h, bg.numpy(), 16)  # fmt: skip
    assert np.abs(render.numpy() - ref_render).max() < 1e-9
    assert np.abs(alphas.numpy() - ref_alphas).max() < 1e-9


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_empty_and_fully_culled_scenes_show_the_background(backend):
    scene, cfg = make_scene(seed=17, n=3, n_cams=2)
    empty = {k: (v[:0] if k not in ("viewmats", "Ks", "backgrounds") else v) for k, v in scene.items()}
    render, alphas, meta = call(empty, cfg, backend=backend)
    assert meta["radii"].shape == (2, 0, 2) and (alphas == 0).all()
    assert torch.equal(render, scene["backgrounds"][:, None, None, :].expand_as(render))
    behind = {**scene, "viewmats": scene["viewmats"].clone()}
    behind["viewmats"][:, 2, 3] = -100.0  # everything far behind both cameras
    render, alphas, meta = call(behind, cfg, backend=backend, render_mode="RGB+D")
    assert (meta["radii"] == 0).all() and (alphas == 0).all() and (render[..., 3] == 0).all()


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_per_camera_colors(backend):
    scene, cfg = make_scene(seed=18, n=30, n_cams=2, n_channels=2)
    per_cam = torch.stack([scene["colors"], 1.0 - scene["colors"]])  # [C, N, D]
    render, _, _ = call({**scene, "colors": per_cam}, cfg, backend=backend)
    for c in range(2):
        one = {**scene, "colors": per_cam[c], "viewmats": scene["viewmats"][c : c + 1], "Ks": scene["Ks"][c : c + 1],
               "backgrounds": scene["backgrounds"][c : c + 1]}  # fmt: skip
        ref_render, _, _ = call_reference(one, cfg)
        assert np.abs(render[c : c + 1].numpy() - ref_render).max() < 1e-6


def _compositor(backend):
    if backend == "torch":
        return torch_backend.rasterize_to_pixels_torch
    from gendistill.core.render.cpu_backend import rasterize_to_pixels_cpu

    return rasterize_to_pixels_cpu


def test_torch_float32_close_to_reference():
    scene, cfg = make_scene(seed=9, n=80)
    render, alphas, _ = call({k: v.float() for k, v in scene.items()}, cfg, backend="torch")
    ref_render, ref_alphas, _ = call_reference(scene, cfg)
    assert render.dtype == torch.float32
    assert np.abs(render.numpy() - ref_render).max() < 2e-5
    assert np.abs(alphas.numpy() - ref_alphas).max() < 2e-5


GRAD_SCENES = {  # name: (make_scene kwargs, rasterize kwargs)
    "tiny": (dict(seed=11, n=7, n_cams=1, width=14, height=11), dict(tile_size=8, render_mode="RGB+ED")),
    # planted cases: culled ones, a capped alpha and a pixel that ends
    "awkward": (dict(seed=0, n=16, n_cams=1), dict(render_mode="RGB")),
}


@pytest.mark.parametrize("case", list(GRAD_SCENES))
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_gradients_match_finite_differences(backend, case):
    scene_kw, kw = GRAD_SCENES[case]
    scene, cfg = make_scene(**scene_kw)
    names = ("means", "quats", "scales", "opacities", "colors", "backgrounds")
    g = torch.Generator().manual_seed(1)
    n_out = 4 if kw["render_mode"] == "RGB+ED" else 3
    w_render = torch.randn(1, cfg["height"], cfg["width"], n_out, generator=g, dtype=torch.float64)
    w_alpha = torch.randn(1, cfg["height"], cfg["width"], 1, generator=g, dtype=torch.float64)

    def f(*xs):
        s = {**scene, **dict(zip(names, xs))}
        render, alphas, _ = call(s, cfg, backend=backend, **kw)
        return (render * w_render).sum() + (alphas * w_alpha).sum()

    inputs = [scene[k].clone().requires_grad_() for k in names]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_gradients_finite_on_random_scene(backend):
    scene, cfg = make_scene(seed=12, sh_degree=3, n_cams=2)
    params = {k: v.clone().requires_grad_() for k, v in scene.items()}
    render, alphas, meta = call(params, cfg, backend=backend, render_mode="RGB+ED")
    (render.square().sum() + alphas.sum()).backward()
    for k, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), k
    visible = (meta["radii"] > 0).all(-1).any(0)
    assert (params["means"].grad[visible].abs().sum(-1) > 0).all()
    assert (params["means"].grad[~visible] == 0).all()


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_meta_supports_gsplat_default_strategy(backend):
    from gsplat.strategy import DefaultStrategy

    scene, cfg = make_scene(seed=13, n_cams=2)
    n = scene["means"].shape[0]
    params = torch.nn.ParameterDict({k: torch.nn.Parameter(scene[k].float()) for k in ("means", "quats", "scales",
                                                                                          "opacities", "colors")})  # fmt: skip
    optimizers = {k: torch.optim.Adam([p], lr=1e-3) for k, p in params.items()}
    s = {**{k: v.float() for k, v in scene.items()}, **params}
    render, alphas, meta = call(s, cfg, backend=backend)

    assert render.shape == (2, cfg["height"], cfg["width"], 3) and alphas.shape == (2, cfg["height"], cfg["width"], 1)
    assert meta["radii"].shape == (2, n, 2) and meta["radii"].dtype == torch.int32
    assert meta["means2d"].shape == (2, n, 2) and meta["depths"].shape == (2, n)
    assert meta["conics"].shape == (2, n, 3) and meta["opacities"].shape == (2, n)
    assert (meta["width"], meta["height"], meta["n_cameras"], meta["tile_size"]) == (cfg["width"], cfg["height"], 2, 16)

    strategy = DefaultStrategy(verbose=False)
    strategy.check_sanity(params, optimizers)
    state = strategy.initialize_state()
    strategy.step_pre_backward(params, optimizers, state, 0, meta)
    render.sum().backward()
    assert meta["means2d"].grad is not None and meta["means2d"].grad.abs().sum() > 0
    strategy.step_post_backward(params, optimizers, state, 0, meta, packed=False)
    assert state["count"].shape == (n,) and state["count"].sum() > 0 and state["grad2d"].sum() > 0


def test_auto_picks_cpu_for_cpu_tensors(monkeypatch):
    assert select_backend("auto", torch.zeros(1)) == "cpu"
    assert select_backend("torch", torch.zeros(1)) == "torch"
    calls = []

    class Spy(RenderBackend):
        def rasterize(self, *args, **kwargs):
            calls.append(kwargs)
            return BACKENDS["torch"].rasterize(*args, **kwargs)

    monkeypatch.setitem(BACKENDS, "cpu", Spy())
    scene, cfg = make_scene(seed=14, n=10)
    call(scene, cfg)  # backend="auto"
    assert len(calls) == 1


def test_gsplat_backend_refuses_cpu_tensors_without_touching_cuda():
    before = {m for m in sys.modules if m.startswith("gsplat.cuda._backend")}
    scene, cfg = make_scene(seed=15, n=10)
    with pytest.raises(ValueError, match="backend 'gsplat' needs CUDA tensors"):
        call(scene, cfg, backend="gsplat")
    assert {m for m in sys.modules if m.startswith("gsplat.cuda._backend")} == before


def test_unknown_backend_is_named():
    scene, cfg = make_scene(seed=15, n=10)
    with pytest.raises(KeyError, match="'nope'.*known: cpu, gsplat, torch"):
        call(scene, cfg, backend="nope")


BAD_INPUTS = {
    "means": (lambda s: {**s, "means": s["means"][:, :2]}, "means must be a \\[N, 3\\]"),
    "quats": (lambda s: {**s, "quats": s["quats"][:-1]}, "quats must be \\[N, 4\\]"),
    "scales": (lambda s: {**s, "scales": s["scales"][:, :1]}, "scales must be \\[N, 3\\]"),
    "opacities": (lambda s: {**s, "opacities": s["opacities"][:, None]}, "opacities must be \\[N\\]"),
    "colors": (lambda s: {**s, "colors": s["colors"][:-1]}, "colors must be"),
    "viewmats": (lambda s: {**s, "viewmats": s["viewmats"][:, :3]}, "viewmats must be a \\[C, 4, 4\\]"),
    "Ks": (lambda s: {**s, "Ks": s["Ks"][:1]}, "Ks must be \\[C, 3, 3\\]"),
    "backgrounds": (lambda s: {**s, "backgrounds": s["backgrounds"][:, :2]}, "backgrounds must be \\[C, D\\]"),
    "dtype": (lambda s: {**s, "scales": s["scales"].float()}, "scales is torch.float32"),
}


@pytest.mark.parametrize("what", list(BAD_INPUTS))
def test_bad_inputs_raise_clear_errors(what):
    scene, cfg = make_scene(seed=16, n=10)
    edit, match = BAD_INPUTS[what]
    with pytest.raises(ValueError, match=match):
        call(edit(scene), cfg, backend="torch")


def test_bad_options_raise_clear_errors():
    scene, cfg = make_scene(seed=16, n=10)
    with pytest.raises(ValueError, match="render_mode must be one of"):
        call(scene, cfg, backend="torch", render_mode="RGBD")
    with pytest.raises(ValueError, match="width must be a positive int"):
        call(scene, {**cfg, "width": 0}, backend="torch")
    sh_scene, sh_cfg = make_scene(seed=16, n=10, sh_degree=1)
    with pytest.raises(ValueError, match="sh_degree=2 needs K >= 9"):
        call(sh_scene, {**sh_cfg, "sh_degree": 2}, backend="torch")
    with pytest.raises(ValueError, match="colors must be"):
        call(sh_scene, {**sh_cfg, "sh_degree": None}, backend="torch")


def _gsplat_parity(scene, cfg, **kw):
    cuda = {k: v.float().cuda().requires_grad_() for k, v in scene.items()}
    outs = {}
    for backend in ("torch", "gsplat"):
        params = {k: v.detach().clone().requires_grad_() for k, v in cuda.items()}
        render, alphas, meta = call(params, cfg, backend=backend, **kw)
        (render.square().sum() + alphas.sum()).backward()
        outs[backend] = (render, alphas, meta, {k: p.grad for k, p in params.items()})
    (r_t, a_t, m_t, g_t), (r_g, a_g, m_g, g_g) = outs["torch"], outs["gsplat"]
    assert (m_t["radii"] == m_g["radii"]).float().mean() > 0.995
    vis = (m_g["radii"] > 0).all(-1)
    torch.testing.assert_close(m_t["means2d"][vis], m_g["means2d"][vis], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(m_t["conics"][vis], m_g["conics"][vis], rtol=1e-4, atol=1e-5)
    diff = (r_t - r_g).abs()
    assert diff.max() < 2e-2 and (diff > 1e-3).float().mean() < 1e-3, (diff.max(), (diff > 1e-3).float().mean())
    assert (a_t - a_g).abs().max() < 2e-2 and (a_t - a_g).abs().mean() < 1e-5
    for k in ("means", "quats", "scales", "opacities", "colors"):
        rel = (g_t[k] - g_g[k]).norm() / g_g[k].norm().clamp_min(1e-12)
        assert rel < 2e-2, (k, rel)


@pytest.mark.cuda
def test_torch_backend_on_cuda_matches_gsplat_random_scene():
    scene, cfg = make_scene(seed=20, n=60, n_cams=2, width=64, height=48, sh_degree=3)
    _gsplat_parity(scene, cfg, render_mode="RGB+ED")


@pytest.mark.cuda
def test_torch_backend_on_cuda_matches_gsplat_hundreds_of_gaussians():
    scene, cfg = make_scene(seed=21, n=600, n_cams=3, width=160, height=120)
    _gsplat_parity(scene, cfg)


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_projection_matches_torch(case):
    """The "cpu" backend's numba projection: same outputs and vector-Jacobian products as the torch one,
    also where some Gaussians get no gradient in some cameras."""
    from gendistill.core.render.cpu_projection import project_gaussians_cpu

    scene_kw, kw = CASES[case]
    scene, cfg = make_scene(**scene_kw)
    extra = {k: kw[k] for k in ("near_plane", "far_plane", "eps2d", "radius_clip") if k in kw}
    results = []
    for fn in (project_gaussians, project_gaussians_cpu):
        args = {k: scene[k].clone().requires_grad_(True) for k in ("means", "quats", "scales")}
        radii, means2d, depths, conics = fn(args["means"], args["quats"], args["scales"], scene["opacities"],
                                            scene["viewmats"], scene["Ks"], cfg["width"], cfg["height"], **extra)
        g = torch.Generator().manual_seed(1)
        keep = torch.rand(depths.shape, generator=g) < 0.7  # no gradient at all for the others: skipped
        loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype) * keep.view(*keep.shape, *[1] * (t.dim() - 2))
                    ).sum() for t in (means2d, depths, conics))
        results.append((radii, means2d, depths, conics, torch.autograd.grad(loss, list(args.values()))))
    (r0, *out0, g0), (r1, *out1, g1) = results
    assert torch.equal(r0, r1) and (r0 > 0).any()
    for a, b in zip(out0 + list(g0), out1 + list(g1)):
        assert a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-10, atol=1e-10)


class ToyBackend(RenderBackend):
    """A backend from outside the package: the torch compositor, counted."""

    def __init__(self):
        self.calls = 0

    def composite(self, *args, **kwargs):
        self.calls += 1
        return torch_backend.rasterize_to_pixels_torch(*args, **kwargs)


def test_a_plugin_backend_renders_through_rasterize(monkeypatch):
    toy = ToyBackend()
    monkeypatch.setitem(BACKENDS, "toy", toy)  # what BACKENDS.register("toy")(ToyBackend()) does in a plugin
    scene, cfg = make_scene(seed=21, n=40, n_cams=2)
    ours, alphas, meta = call(scene, cfg, backend="toy", render_mode="RGB+ED")
    ref, ref_alphas, _ = call(scene, cfg, backend="torch", render_mode="RGB+ED")
    assert toy.calls == 1 and torch.equal(ours, ref) and torch.equal(alphas, ref_alphas)
    assert meta["means2d"].shape == (2, 40, 2)
    with pytest.raises(KeyError, match="unknown render backend 'nope'; known: .*toy"):
        call(scene, cfg, backend="nope")
