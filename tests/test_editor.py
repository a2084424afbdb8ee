"""`gendistill edit` (RoMaP part editing) end to end on CPU with tiny pipelines, plus its small stages."""

import json
import math
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from plyfile import PlyData

from gendistill.config import ConfigError
from gendistill.cli import main as cli_main
from gendistill.core.cameras import orbit_path
from gendistill.core.render import RestCache, render_part
from gendistill.core.scene import GaussianScene
from gendistill.splat_edit import editor as editor_mod
from gendistill.splat_edit.edit_config import load_edit_config
from gendistill.splat_edit.editor import (
    activated,
    background_gaussians,
    camera_angles,
    pick_anchor_views,
    prepare_edit,
    remove_prior,
    run_edit,
    visible_gaussians,
)
from gendistill.testing.diffusion import write_tiny_pipeline
from gendistill.splat_edit.report import loss_curve_image, psnr_outside

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "splat_edit" / "tiny_cpu.yaml"
SCENE = ROOT / "assets" / "scenes" / "snowman.ply"
HAT = 3  # the demo scene's part id of "hat"
FAST = ["report.turntable_frames=4", "report.grid_views=2"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny SD3 and InstructPix2Pix pipelines and a tiny CLIP, saved once per module."""
    from transformers import CLIPConfig, CLIPModel

    from gendistill.testing.diffusion import MAX_TOKENS, tiny_tokenizer

    root = tmp_path_factory.mktemp("tiny_models")
    torch.manual_seed(0)
    text = dict(vocab_size=520, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                max_position_embeddings=MAX_TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(root / "clip")
    tiny_tokenizer().save_pretrained(root / "clip")
    return {"sd3": root / "sd3", "ip2p": root / "ip2p", "clip": root / "clip"}


def _overrides(out, models, *extra):
    return [f"scene={SCENE}", "part=hat", "prompt=a snowman with a hat", "edit_prompt=a snowman with a gold hat",
            f"out={out}", f"guidance.model={models['sd3']}", *FAST, *extra]


@pytest.fixture(scope="module")
def run(models, tmp_path_factory):
    """One edit of 3 steps through the `gendistill edit` entry, with CLIP metrics."""
    out = tmp_path_factory.mktemp("edit") / "run"
    assert cli_main(["edit", "--config", str(CONFIG), "--no-progress",
                     *_overrides(out, models, "steps=3", f"report.clip_model={models['clip']}",
                                 "export=[ply,spz,splat]")]) == 0
    return out


def test_outputs_summary_and_report_links(run):
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["interrupted"] is False and summary["steps_skipped_nonfinite"] == 0
    g = summary["gaussians"]
    assert g["part_input"] == 3500 and g["outside"] == 11500
    assert g["output"] == g["outside"] + g["part_output"]
    assert g["part_output"] == g["part_input"] - g["removed"] + g["added"]
    assert g["changed"] > 0
    m = summary["metrics"]
    assert m["psnr_outside_db"] > 40  # only the part changed: pixels it does not cover stay put
    assert -1 <= m["clip_similarity"] <= 1 and -1 <= m["clip_directional_similarity"] <= 1
    # prior removal: the part starts neutral grey, the input hat is black
    assert max(m["mean_part_color"]["before"]) < 0.2
    assert all(abs(v - 0.5) < 0.1 for v in m["mean_part_color"]["after"])
    for name in ("edited.ply", "masks3d/hat.npy", "before_after.png", "turntable.mp4", "loss_curve.png",
                 "report.html", "config.yaml"):
        assert (run / name).is_file(), name
    assert len(list((run / "anchors").glob("*_target.png"))) == 1
    assert summary["exported"] == {f: str(run / f"edited.{f}") for f in ("ply", "spz", "splat")}
    edited = GaussianScene.load(run / "edited.ply")
    for fmt in ("spz", "splat"):  # the same scene, within the format's quantisation
        other = GaussianScene.load(run / f"edited.{fmt}")
        assert len(other) == len(edited)
        assert torch.allclose(other.means.sort(0).values, edited.means.sort(0).values, atol=1e-3)
    page = (run / "report.html").read_text()
    assert f"gendistill view {SCENE} edited.ply --masks3d masks3d" in page  # the viewer, for this run folder
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert "turntable.mp4" in refs and "edited.ply" in refs and any(r.startswith("anchors/") for r in refs)
    for ref in refs:
        assert (run / ref).is_file(), f"report.html links a missing file {ref}"


def test_outside_bytes_identical_inside_changed(run):
    before = PlyData.read(str(SCENE))["vertex"].data
    after = PlyData.read(str(run / "edited.ply"))["vertex"].data
    mask = np.load(run / "masks3d" / "hat.npy")
    assert mask.dtype == bool and mask.shape == (len(before),) and mask.sum() == 3500
    assert np.array_equal(mask, before["part"] == HAT)
    assert before.dtype == after.dtype
    # the `part` property follows each Gaussian (densified copies inherit it): outside rows keep their bytes
    assert before[~mask].tobytes() == after[after["part"] != HAT].tobytes()
    inside = after[after["part"] == HAT]
    assert len(inside) == json.loads((run / "summary.json").read_text())["gaussians"]["part_output"]
    assert not np.allclose(inside["f_dc_0"][: 100], before[mask]["f_dc_0"][: 100])
    scene = GaussianScene.load_ply(run / "edited.ply")
    assert len(scene) == len(after) and scene.sh_degree == 1 and scene.metadata()["part_names"] == "body head nose hat"


def test_interrupt_writes_loadable_result(models, tmp_path):
    """A real SIGINT, then SIGTERM, mid-run: the loop stops after the step, the result is complete."""
    handler = signal.getsignal(signal.SIGINT)
    for sig in (signal.SIGINT, signal.SIGTERM):
        out = tmp_path / sig.name
        cfg = load_edit_config(CONFIG, _overrides(out, models, "steps=50", "densify.enabled=false"))

        def stop_at_two(editor, record):
            if record["step"] == 2:
                os.kill(os.getpid(), sig)

        result = run_edit(cfg, callback=stop_at_two, progress=False)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["interrupted"] == sig.name
        scene = GaussianScene.load_ply(out / "edited.ply")
        assert len(scene) == 15000  # no densification: indices unchanged
        original = GaussianScene.load_ply(SCENE)
        keep = original.extras["part"] != HAT
        assert torch.equal(scene.sh[keep], original.sh[keep]) and torch.equal(scene.means, original.means)
        assert (out / "report.html").is_file() and result.summary["steps"] == 2
    assert signal.getsignal(signal.SIGINT) is handler  # handlers restored


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_in_a_cli_subprocess(models, tmp_path, free_port, sig, code):
    """SIGINT / SIGTERM to a running `python -m gendistill edit`: a complete result, then exit 130 / 143
    (a scheduler tells an interrupted run from a finished one). The SIGINT run has its live view on:
    the same rules hold with the page's server threads running."""
    import subprocess
    import sys
    import time

    out = tmp_path / "cli"
    live = [f"viewer.port={free_port()}", "viewer.every=1"] if sig == signal.SIGINT else []
    cmd = [sys.executable, "-m", "gendistill", "edit", "--config", str(CONFIG), "--no-progress",
           *_overrides(out, models, "steps=100000", "densify.enabled=false", *live)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    try:
        deadline = time.time() + 120
        while not list((out / "anchors").glob("*_target.png")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # inside the optimisation loop now
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, stderr[-2000:]
    assert f"{sig.name}: stopped after step" in stderr and "outputs in" in stdout
    assert ("live view: http://127.0.0.1:" in stderr) == bool(live)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] == sig.name and 0 < summary["steps"] < 100000
    assert len(GaussianScene.load_ply(out / "edited.ply")) == 15000 and (out / "report.html").is_file()


def test_the_live_view_shows_the_part_as_it_is_edited(models, tmp_path, free_port, monkeypatch):
    """`viewer.port`: every `viewer.every` steps the page gets the part's Gaussians, the losses and the
    latest SDS view; the page stops with the edit."""
    import socket
    import urllib.request

    import gendistill.viewer.live as live

    started, pages, real = [], [], live.start_live_view

    def spy(*args, **kwargs):
        view = real(*args, **kwargs)
        pages.append(urllib.request.urlopen(view.url, timeout=10).read())  # served while the edit runs
        started.append(view)
        return view

    monkeypatch.setattr(live, "start_live_view", spy)
    out, port = tmp_path / "live", free_port()
    assert cli_main(["edit", "--config", str(CONFIG), "--no-progress",
                     *_overrides(out, models, "steps=4", "densify.enabled=false", f"viewer.port={port}",
                                 "viewer.every=2")]) == 0
    (view,) = started
    assert b"<html" in pages[0].lower() and view.steps == [2, 4]
    edited, hat = GaussianScene.load_ply(out / "edited.ply"), np.load(out / "masks3d" / "hat.npy")
    np.testing.assert_allclose(view.part_node.centers, edited.means[torch.from_numpy(hat)].numpy(), atol=1e-6)
    assert all(len(v) == 2 and np.isfinite(v).all() for v in view.losses.values())
    ring = load_edit_config(out / "config.yaml").cameras
    assert view.image.image.shape[:2] == (ring.height, ring.width)
    with socket.socket() as sock:  # the page stopped with the edit: nothing listens on its port (TIME_WAIT is fine)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", int(view.url.rsplit(":", 1)[1])))


def test_crash_leaves_no_partial_scene(models, tmp_path):
    out = tmp_path / "crash"
    cfg = load_edit_config(CONFIG, _overrides(out, models, "steps=5", "densify.enabled=false"))

    def crash(editor, record):
        if record["step"] == 1:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_edit(cfg, callback=crash, progress=False)
    assert not (out / "edited.ply").exists() and not list(out.glob(".edited*"))
    assert np.load(out / "masks3d" / "hat.npy").sum() == 3500  # what was finished is whole


def test_ip2p_guidance_and_anchor(models, tmp_path):
    out = tmp_path / "ip2p"
    cfg = load_edit_config(CONFIG, _overrides(out, models, "steps=2", f"guidance.model={models['ip2p']}",
                                              "guidance.tiny=ip2p", "guidance.kind=ip2p", "guidance.guidance_scale=7.5",
                                              "guidance.pipeline_kwargs={}", "anchors.ip2p_steps=2",
                                              "prior_removal=false", "densify.enabled=false"))
    result = run_edit(cfg, progress=False)
    assert result.summary["anchor_method"] == "ip2p" and result.summary["guidance"]["kind"] == "ip2p"
    assert result.summary["steps"] == 2 and (out / "edited.ply").is_file()


@pytest.mark.parametrize("extra, error, match", [
    (["part=scarf"], ValueError, r"part 'scarf' matches no Gaussian"),
    (["cameras.center=[0,0,100]", "cameras.radius=1.0"], ValueError, r"no Gaussian .* is in view of any"),
    (["colour=red"], ConfigError, r"unknown key 'colour'"),
    (["anchors.slamp={num_step: 3}"], ConfigError, r"unknown key 'anchors.slamp.num_step'"),
    (["guidance.options={grad_clp: 1.0}"], ValueError, r"guidance.options: unknown option\(s\) grad_clp for kind"),
    (["cameras=3"], ConfigError, r"'cameras' is a section"),
    (["guidance.model=/no/such/model", "guidance.tiny=null"], FileNotFoundError, r"model path '/no/such/model' does"),
])
def test_bad_input_fails_before_long_work(models, tmp_path, monkeypatch, capsys, extra, error, match):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(editor_mod, "load_edit_guidance", no_model)
    overrides = _overrides(tmp_path / "bad", models, *extra)
    with pytest.raises(error, match=match):
        run_edit(load_edit_config(CONFIG, overrides), progress=False)
    assert not (tmp_path / "bad" / "edited.ply").exists()
    assert cli_main(["edit", "--config", str(CONFIG), *overrides]) == 2  # the CLI reports it in one line
    err = capsys.readouterr().err
    assert re.search(match, err) and "Traceback" not in err


def test_configs_load():
    req = ["scene=s.ply", "part=hat", "edit_prompt=x", "out=o"]
    expect = {"romap_sd3": ("rfds", 100.0, [0.019, 0.699]), "sds_sd21": ("sds", 100.0, [0.02, 0.98]),
              "ip2p": ("ip2p", 7.5, [0.02, 0.98]), "tiny_cpu": ("rfds", 100.0, [0.019, 0.699])}
    for name, (kind, scale, t_range) in expect.items():
        cfg = load_edit_config(ROOT / "configs" / "splat_edit" / f"{name}.yaml", req)
        assert (cfg.guidance.kind, cfg.guidance.guidance_scale, cfg.guidance.t_range) == (kind, scale, t_range)
        assert (cfg.optim.lr_color, cfg.optim.lr_opacity, cfg.optim.lr_scale, cfg.optim.lr_rotation) == \
            (0.0125, 0.01, 0.005, 0.001)
    with pytest.raises(ConfigError, match="required key"):
        load_edit_config(CONFIG, ["part=hat"])


def test_write_tiny_pipeline_loads_with_from_pretrained(models):
    from diffusers import DiffusionPipeline

    folder = write_tiny_pipeline("sd3", models["sd3"].parent / "sd3_again")
    pipe = DiffusionPipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.transformer.config.patch_size == 2


def test_anchor_loss_pulls_the_part_to_its_target(models, tmp_path):
    """Only the anchor L1 (lambda_sds = 0) towards a gold target: the part's rendered colour moves to gold."""
    from gendistill.splat_edit.editor import Anchors, prepare_edit

    cfg = load_edit_config(CONFIG, _overrides(tmp_path, models, "lambda_sds=0", "lambda_anchor=1", "steps=40",
                                              "densify.enabled=false", "anchors.views=[3]"))
    editor, _ = prepare_edit(cfg, progress=False)
    cams = editor.cameras[[3]]
    with torch.no_grad():
        rgb, cov, _ = editor.render(cams)
    mask = cov > 0.5
    gold = torch.tensor([1.0, 0.8, 0.1])
    images = rgb.permute(0, 3, 1, 2)
    targets = torch.where(mask[:, None], gold.view(1, 3, 1, 1), images)
    editor.set_anchors(Anchors(views=[3], cameras=cams, images=images, masks=mask, targets=targets))
    start = (rgb[mask] - gold).abs().mean()
    for _ in range(cfg.steps):
        editor.step()
    with torch.no_grad():
        rgb, _, _ = editor.render(cams)
    end = (rgb[mask] - gold).abs().mean()
    assert end < 0.7 * start, (float(start), float(end))  # lr 0.0125 on the SH DC: ~0.0035 per step
    assert editor.history[-1]["anchor"] < editor.history[0]["anchor"] and editor.history[0]["sds"] == 0.0
    scene = editor.edited_scene()
    keep = editor.scene.extras["part"] != HAT
    assert torch.equal(scene.sh[keep], editor.scene.sh[keep])  # the rest never moves


def test_a_plugin_backend_renders_the_edit(models, tmp_path, monkeypatch):
    """A render backend registered from outside the package runs the editor (through the cached-rest path):
    the same steps as the torch backend, whose compositor it wraps."""
    from gendistill.core.render import BACKENDS
    from gendistill.splat_edit.editor import prepare_edit

    from test_render import ToyBackend

    toy = ToyBackend()
    monkeypatch.setitem(BACKENDS, "toy", toy)
    history = {}
    for backend in ("toy", "torch"):
        cfg = load_edit_config(CONFIG, _overrides(tmp_path / backend, models, "steps=2", "densify.enabled=false",
                                                  "anchors.method=none", f"backend={backend}"))
        editor, _ = prepare_edit(cfg, progress=False)
        for _ in range(cfg.steps):
            editor.step()
        history[backend] = [(r["loss"], r["sds"]) for r in editor.history]
    assert toy.calls >= 2 and history["toy"] == history["torch"]


def test_galp_segmentation_then_reuse(tmp_path):
    """3D-GALP from a 2D mask folder (as `gendistill segment`), then the same mask from its outputs."""
    from gendistill.splat_edit.edit_inputs import load_scene, make_cameras, segment_part
    from gendistill.splat_edit.part_masks import write_mask_folder

    scene = load_scene(SCENE, torch.device("cpu"))
    write_mask_folder(scene, orbit_path(scene.center(0.01), 3.2, 8, elevation_deg=20.0, width=48, height=48),
                      tmp_path / "masks", parts=["hat", "head"])
    base = ["scene=" + str(SCENE), "part=hat", "edit_prompt=x", f"out={tmp_path / 'run'}"]
    galp = ["segment.source=galp", f"segment.mask_options={{path: {tmp_path / 'masks'}}}", "segment.parts=[hat,head]",
            "segment.galp={steps: 40, lr: 0.05, n_anchors: 200, knn: 8, softness_every: 20, views_per_step: 2, "
            "sh_degree: 0}"]
    cfg = load_edit_config(CONFIG, base + galp)
    cams = make_cameras(cfg.cameras, scene)
    mask = segment_part(scene, cfg, cams, work_dir=tmp_path / "seg", progress=False)
    truth = scene.extras["part"] == HAT
    assert float((mask & truth).sum() / (mask | truth).sum()) > 0.7
    assert (tmp_path / "seg" / "labelled.ply").is_file() and (tmp_path / "seg" / "masks3d" / "head.npy").is_file()
    again = segment_part(scene, load_edit_config(CONFIG, base + [f"segment.mask_file={tmp_path / 'seg'}"]), cams)
    assert torch.equal(again, mask)
    labels = segment_part(scene, load_edit_config(CONFIG, base + [f"segment.labelled_ply={tmp_path / 'seg/labelled.ply'}"]),
                          cams)
    assert float((labels & mask).sum() / (labels | mask).sum()) > 0.9  # all directions vs the training views


# ---------------------------------------------------------------------- small stages
@pytest.mark.parametrize("backend,opaque", [("cpu", False), ("cpu", True), ("torch", True)])
def test_cached_rest_renders_exactly_as_a_full_render(backend, opaque):
    # the cache projects only the part, composites only the pixels it can reach and drops rest Gaussians
    # that never show in a view: images, coverage and part gradients must not change. Opaque: alpha
    # 0.999 everywhere, so most pixels end at a fragment that is not composited but hides the rest
    scene = GaussianScene.load_ply(SCENE)
    if opaque:
        scene.opacity_logits.fill_(10.0)
    hat = scene.extras["part"] == 3
    lo, hi = scene.bbox(0.01)
    cams = orbit_path((lo + hi).double() / 2, 2.6 * float((hi - lo).norm()) / 2, 5, elevation_deg=25, width=40,
                      height=34)
    cams = type(cams).cat([cams, orbit_path((lo + hi).double() / 2, 0.4, 1, elevation_deg=0, width=40, height=34)])
    act = lambda m: activated(scene.means[m], scene.quats[m], scene.log_scales[m],  # noqa: E731
                                          scene.opacity_logits[m], scene.sh[m])
    rest = act(~hat)
    part = {k: v.clone().requires_grad_(True) for k, v in act(hat).items()}
    bg = torch.tensor([0.2, 0.5, 0.9])
    cache = RestCache()

    def render(c, cache):
        rgb, cov, meta = render_part(rest, part, c, sh_degree=scene.sh_degree, background=bg, backend=backend,
                                     rest_cache=cache)
        grads = torch.autograd.grad((rgb * torch.linspace(0, 1, 3)).sum() + cov.sum(), list(part.values()))
        return rgb.detach(), cov.detach(), grads, meta

    full = render(cams, None)
    render(cams[[0, 2]], cache)  # the first visit fills the cache
    assert len(cache.entries) == 2
    cached = render(cams, cache)
    assert len(cache.entries) == len(cams)
    again = render(cams, cache)
    assert cached[3]["means2d"].shape[1] < full[3]["means2d"].shape[1]  # fewer Gaussians composited
    for got in (cached, again):
        assert torch.allclose(got[0], full[0], atol=1e-5) and torch.allclose(got[1], full[1], atol=1e-5)
        for g, f in zip(got[2], full[2]):
            assert torch.allclose(g, f, atol=1e-5, rtol=1e-4)
    assert full[1].amax((1, 2))[:5].min() > 0.5 and full[0][5].std() > 0  # the hat shows; the last is inside
    # a float64 rest with the editor's float32 part parameters
    rest64 = {k: v.double() for k, v in rest.items()}
    rgb64, cov64, _ = render_part(rest64, part, cams, sh_degree=scene.sh_degree, background=bg, backend=backend,
                                  rest_cache=RestCache())
    assert rgb64.dtype == torch.float64 and torch.allclose(rgb64.float(), full[0], atol=1e-3)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_cached_rest_edge_cases_render_as_a_full_render(backend):
    """A float32 needle in the rest whose rounded conic draws past its radii (its layer box must come
    from the ellipse the kernels draw, not the radii), and a view where the whole rest is culled."""
    from gendistill.core.cameras import Cameras
    from gendistill.core.render.sh import SH_C0

    f, dt = 200.0, torch.float32
    cams = Cameras(torch.eye(4, dtype=dt)[None], torch.tensor([[[f, 0, 32.0], [0, f, 32.0], [0, 0, 1]]], dtype=dt),
                   64, 64)
    one = lambda mean, quat, scale, opacity, rgb: {  # noqa: E731
        "means": torch.tensor([mean], dtype=dt), "quats": torch.tensor([quat], dtype=dt),
        "scales": torch.tensor([scale], dtype=dt), "opacities": torch.tensor([opacity], dtype=dt),
        "sh": (torch.tensor([[rgb]], dtype=dt) - 0.5) / SH_C0}
    needle = one([-60.735, -26.4, 5.0], [math.cos(0.2), 0, 0, math.sin(0.2)], [20.0, 1e-5, 1e-5], 0.9, [0, 1, 0])
    behind = one([0.0, 0.0, -3.0], [1, 0, 0, 0], [0.1, 0.1, 0.1], 0.8, [0, 1, 0])
    part = one([15.5 / f * 8, -22.5 / f * 8, 8.0], [1, 0, 0, 0], [1e-3, 1e-3, 1e-3], 0.05, [1, 0, 0])
    part = {k: v.requires_grad_(True) for k, v in part.items()}
    bg = torch.tensor([0.0, 0.0, 1.0])
    for rest in (needle, behind):
        whole = render_part(rest, part, cams, sh_degree=0, background=bg, backend=backend)
        cache = RestCache()
        for _ in range(2):  # fills the cache, then uses it
            cached = render_part(rest, part, cams, sh_degree=0, background=bg, backend=backend, rest_cache=cache)
        assert len(cache.entries) == 1
        assert torch.allclose(cached[0], whole[0], atol=1e-6) and torch.allclose(cached[1], whole[1], atol=1e-6)
    assert (whole[1] > 0).any()


@pytest.mark.cuda
def test_cached_torch_render_on_cuda_matches_gsplat():
    # on a GPU the editor renders with gsplat; without it, with the cached torch path: they must agree
    scene = GaussianScene.load_ply(SCENE).to("cuda")
    hat = scene.extras["part"] == 3
    lo, hi = scene.bbox(0.01)
    cams = orbit_path((lo + hi).double().cpu() / 2, 2.6 * float((hi - lo).norm()) / 2, 4, elevation_deg=25, width=64,
                      height=64)
    act = lambda m: activated(scene.means[m], scene.quats[m], scene.log_scales[m],  # noqa: E731
                                          scene.opacity_logits[m], scene.sh[m])
    rest, part = act(~hat), act(hat)
    bg = torch.tensor([0.2, 0.5, 0.9], device="cuda")
    cache = RestCache()
    out = {}
    for backend, c in (("gsplat", None), ("torch", cache), ("torch", cache)):
        out[backend] = render_part(rest, part, cams, sh_degree=scene.sh_degree, background=bg, backend=backend,
                                   rest_cache=c)
    assert len(cache.entries) == len(cams)
    assert (out["gsplat"][0] - out["torch"][0]).abs().max() < 1e-3
    assert (out["gsplat"][1] - out["torch"][1]).abs().max() < 1e-3


def test_remove_prior_is_grey_and_leaves_the_rest():
    sh = torch.randn(5, 4, 3)
    mask = torch.tensor([True, False, True, False, False])
    out = remove_prior(sh, mask, "all")
    assert torch.equal(out[~mask], sh[~mask]) and torch.equal(out[mask], torch.zeros(2, 4, 3))
    assert torch.equal(sh[mask] != 0, torch.ones(2, 4, 3, dtype=torch.bool))  # the input is untouched
    dc = remove_prior(sh, mask)  # RoMaP's: the DC term only, view-dependent terms kept
    assert torch.equal(dc[mask, 0], torch.zeros(2, 3)) and torch.equal(dc[mask, 1:], sh[mask, 1:])
    assert torch.equal(dc[~mask], sh[~mask])
    with pytest.raises(ValueError, match="'dc' or 'all'"):
        remove_prior(sh, mask, "rest")


def test_romap_config_edits_as_released():
    """romap_sd3.yaml: SDS prompt = prompt + " " + edit_prompt, DC-only prior removal at label threshold
    1.0, masked-mean reduction; YAML booleans still read (true -> dc, false -> none); bad values named."""
    from gendistill.splat_edit.edit_config import load_edit_config
    from gendistill.splat_edit.editor import sds_prompt

    req = ["scene=s.ply", "part=hat", "out=o", "prompt=a snowman with a hat", "edit_prompt=in a gold hat"]
    cfg = load_edit_config(ROOT / "configs" / "splat_edit" / "romap_sd3.yaml", req)
    assert sds_prompt(cfg) == "a snowman with a hat in a gold hat"
    assert cfg.prior_removal == "dc" and cfg.segment.threshold == 1.0 and cfg.guidance.reduction == "masked_mean"
    assert cfg.segment.galp.variant == "romap"  # 3D-GALP as released
    plain = load_edit_config(None, [*req, "guidance.model=m"])
    assert sds_prompt(plain) == "in a gold hat"  # ours: the edit prompt alone
    assert load_edit_config(None, [*req, "guidance.model=m", "prior_removal=true"]).prior_removal == "dc"
    assert load_edit_config(None, [*req, "guidance.model=m", "prior_removal=false"]).prior_removal == "none"
    for key, bad in (("prior_removal", "some"), ("sds_prompt", "both"), ("guidance.reduction", "max")):
        with pytest.raises(ValueError, match=key):
            load_edit_config(None, [*req, "guidance.model=m", f"{key}={bad}"])


def test_camera_angles_of_an_orbit():
    cams = orbit_path([0.0, 0.0, 1.0], 3.0, 8, elevation_deg=20.0, width=16, height=16)
    azi, ele = camera_angles(cams, torch.tensor([0.0, 0.0, 1.0]), [0, 0, 1], front_deg=45.0)
    expected = (torch.arange(8.0) * 45.0 - 45.0 + 180.0) % 360.0 - 180.0
    torch.testing.assert_close(azi.float(), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(ele.float(), torch.full((8,), 20.0), atol=1e-4, rtol=0)


def test_pick_anchor_views_spreads_by_azimuth():
    coverage = torch.tensor([50.0, 90.0, 80.0, 10.0, 0.0, 70.0])
    azimuth = torch.tensor([0.0, 10.0, 20.0, 180.0, 90.0, 200.0])
    assert pick_anchor_views(coverage, azimuth, 1) == [1]
    assert pick_anchor_views(coverage, azimuth, 2, 60.0) == [1, 5]
    assert pick_anchor_views(coverage, azimuth, 4, 60.0) == [1, 5, 2, 0]  # separation relaxed when short
    assert 4 not in pick_anchor_views(coverage, azimuth, 6)  # a view that misses the part is never picked


def test_background_gaussians_hits_masked_background_pixels():
    cams = orbit_path([0.0, 0.0, 0.0], 4.0, 1, elevation_deg=0.0, width=8, height=8)
    # the camera sits on +x looking at the origin: world y maps to image -x, world z to image -y
    means = torch.tensor([[0.0, 0.0, 0.0], [0.0, -0.8, 0.8], [0.0, 0.8, -0.8], [10.0, 0.0, 0.0]])
    uv, _ = cams.project(means)
    px = uv[0].floor().long()
    targets = torch.full((1, 3, 8, 8), 0.7)
    masks = torch.ones(1, 8, 8, dtype=torch.bool)
    targets[0, :, px[0, 1], px[0, 0]] = 0.01  # background (black) under Gaussian 0
    targets[0, :, px[2, 1], px[2, 0]] = 0.0
    masks[0, px[2, 1], px[2, 0]] = False  # ... but outside the part mask for Gaussian 2
    drop = background_gaussians(means, cams, masks, targets, torch.zeros(3), tolerance=0.02)
    assert drop.tolist() == [True, False, False, False]  # Gaussian 3 is behind the camera


def test_psnr_outside_and_loss_curve():
    before = torch.zeros(2, 4, 4, 3)
    after = before.clone()
    after[:, :2] = 0.1  # mse 0.01 on the top half
    cov = torch.zeros(2, 4, 4)
    cov_after = cov.clone()
    cov_after[:, 2:] = 1.0  # the part covers the bottom half after the edit
    r = psnr_outside(before, after, cov, cov_after, 0.02)
    assert r["outside_pixels"] == 16 and math.isclose(r["psnr_outside_db"], 20.0, abs_tol=1e-4)
    assert psnr_outside(before, before, cov, cov, 0.02)["psnr_outside_db"] == 100.0
    hist = [{"loss": float(10 - i), "sds": 1.0, "anchor": float(i)} for i in range(10)]
    img, ranges = loss_curve_image(hist, size=(200, 100))
    assert img.shape == (100, 200, 3) and img.dtype == np.uint8
    assert ranges["loss"] == (1.0, 10.0) and ranges["anchor"] == (0.0, 9.0)
    assert (img == (214, 39, 40)).all(-1).sum() > 100  # the anchor series is drawn in red


def test_nonfinite_steps_are_skipped_counted_and_stop_the_edit(models, tmp_path, monkeypatch):
    """A guidance gradient with NaN/inf (an fp16 overflow) skips the step (no update, counted), and
    max_nonfinite_steps of them in a row stop the edit with a clear error (no edited.ply written)."""
    from gendistill.splat_edit.editor import prepare_edit

    cfg = load_edit_config(CONFIG, _overrides(tmp_path / "a", models, "steps=4", "densify.enabled=false",
                                              "anchors.method=none", "max_nonfinite_steps=3"))
    editor, _ = prepare_edit(cfg, progress=False)
    g = editor.guidance
    real = g.compute_grad
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        grad, w = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] in (2, 3):
            grad = grad.clone()
            grad.view(-1)[:5] = float("nan")
        return grad, w

    monkeypatch.setattr(g, "compute_grad", sometimes_nan)
    before = {k: v.detach().clone() for k, v in editor.params.items()}
    first = editor.step()
    after_first = {k: v.detach().clone() for k, v in editor.params.items()}
    assert not first["skipped"] and any(not torch.equal(before[k], after_first[k]) for k in before)
    second, third = editor.step(), editor.step()
    assert second["skipped"] and third["skipped"] and editor.nonfinite_steps == 2
    assert all(torch.equal(after_first[k], v) for k, v in editor.params.items())  # no Adam update from NaN
    assert not editor.step()["skipped"] and editor._nonfinite_run == 0
    monkeypatch.setattr(g, "compute_grad", lambda *a, **k: (torch.full_like(a[0], float("inf")), real(*a, **k)[1]))
    editor.step(), editor.step()
    with pytest.raises(FloatingPointError, match="3 edit steps in a row had NaN/inf gradients"):
        editor.step()
    # through the command: the error is one line, and nothing half-done is written
    bad = _overrides(tmp_path / "b", models, "steps=3", "anchors.method=none", "max_nonfinite_steps=2",
                     "guidance.options={grad_clip: 1.0}")
    monkeypatch.setattr(type(g), "compute_grad", lambda self, *a, **k: (torch.full_like(a[0], float("nan")),
                                                                         torch.ones(a[0].shape[0])))
    with pytest.raises(FloatingPointError):
        run_edit(load_edit_config(CONFIG, bad), progress=False)
    assert not (tmp_path / "b" / "edited.ply").exists()


# ---------------------------------------------------------------------- unbounded real scenes
@pytest.fixture
def garden_unbounded(tmp_path):
    """The committed garden sample (8,000 real points) inside a far background shell, as a capture's
    unbounded scene; the part is a small central cluster of the real points."""
    with np.load(ROOT / "tests" / "data" / "garden" / "garden_points.npz") as z:
        pts, cols = z["means3d"].astype(np.float64), z["colors"]
    centre = np.median(pts, axis=0)
    g = np.random.default_rng(0).normal(size=(4000, 3))
    shell = centre + 40.0 * g / np.linalg.norm(g, axis=1, keepdims=True)  # sky / far background
    scene = GaussianScene.from_points(np.concatenate([pts, shell]).astype(np.float32),
                                      np.concatenate([cols, np.full((4000, 3), 128, np.uint8)]), sh_degree=0)
    dist = np.linalg.norm(pts - centre, axis=1)
    mask = np.zeros(len(scene), bool)
    mask[: len(pts)] = dist < np.quantile(dist, 0.05)  # the 400 most central real points
    scene.save_ply(tmp_path / "garden.ply")
    np.save(tmp_path / "part.npy", mask)
    return tmp_path / "garden.ply", tmp_path / "part.npy", mask


def test_an_unbounded_scene_rings_the_part_by_default(models, tmp_path, garden_unbounded):
    from gendistill.splat_edit.edit_inputs import resolve_ring

    scene_path, mask_path, mask = garden_unbounded
    base = [f"scene={scene_path}", "part=table", f"segment.mask_file={mask_path}", "edit_prompt=x",
            f"out={tmp_path / 'run'}", f"guidance.model={models['sd3']}", "lambda_sds=0", "cameras.up=auto"]
    with pytest.raises(ValueError) as err:  # the scene's ring: outside everything, the part in no view
        prepare_edit(load_edit_config(CONFIG, base + ["cameras.center=scene"]), progress=False)
    msg = str(err.value)
    assert "part 'table' (400 Gaussians, centre [" in msg and "the scene's radius is" in msg
    assert "cameras.center=part" in msg and "cameras.radius" in msg
    editor, _ = prepare_edit(load_edit_config(CONFIG, base), progress=False)  # default "auto": the part's ring
    scene = GaussianScene.load(scene_path)
    part = scene.subset(torch.from_numpy(mask))
    torch.testing.assert_close(torch.tensor(editor.cfg.cameras.center, dtype=torch.float64), part.center(0.01).double(), atol=1e-5, rtol=0)
    seen = visible_gaussians(scene.means, editor.cameras)
    assert seen[:, torch.from_numpy(mask)].any(1).all()  # the part is in every view
    assert resolve_ring(editor.cfg.cameras, scene, torch.from_numpy(mask)) == editor.cfg.cameras  # resolved once


def test_up_auto_from_cameras_or_the_ground():
    from gendistill.core.cameras import orbit_path
    from gendistill.splat_edit.edit_inputs import estimate_up

    g = np.random.default_rng(1)
    ground = np.c_[g.uniform(-5, 5, (3000, 2)), g.normal(0, 0.02, 3000)]  # a flat ground at z = 0 ...
    things = np.c_[g.uniform(-1, 1, (600, 2)), g.uniform(0, 2, 600)]  # ... with things standing on it
    for up in ([0.0, 0.0, 1.0], [0.0, -1.0, 0.0]):  # z up, and y down as in OpenCV-style captures
        r = torch.tensor([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]]) if up[1] else torch.eye(3)  # z -> -y
        pts = torch.from_numpy(np.r_[ground, things]).float() @ r.T
        scene = GaussianScene.from_points(pts, sh_degree=0)
        torch.testing.assert_close(torch.tensor(estimate_up(scene), dtype=torch.float64), torch.tensor(up, dtype=torch.float64),
                                   atol=0.02, rtol=0)
        cams = orbit_path([0.0, 0.0, 0.0], 4.0, 6, up=up)
        torch.testing.assert_close(torch.tensor(estimate_up(scene, cams), dtype=torch.float64), torch.tensor(up, dtype=torch.float64),
                                   atol=1e-5, rtol=0)
