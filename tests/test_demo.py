"""The offline demo: the bundled tiny model (assets/models/snowman-tiny) knows hat colours, and the
demo edit (configs/splat_edit/demo_cpu.yaml) turns the snowman's hat blue and nothing else."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "assets/models/snowman-tiny"
CONFIG = ROOT / "configs/splat_edit/demo_cpu.yaml"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_bundled_model_is_small_and_loads_as_pixel_sds(offline):
    from gendistill.core.guidance import load_guidance

    sizes = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert sizes < 25e6
    assert not list(MODEL.rglob("*.bin")) and list(MODEL.rglob("*.safetensors"))
    g = load_guidance(str(MODEL), guidance_scale=10.0, device="cpu")
    assert g.kind == "sds" and g.vae is None and g.unet.config.in_channels == 3
    images = torch.full((1, 3, 32, 32), 0.5, requires_grad=True)
    g.loss(images, "a snowman with a blue hat").backward()
    assert images.grad.abs().sum() > 0


def test_blue_and_red_prompts_give_blue_and_red_hats(offline):
    train = _tool("train_demo_models")
    torch.manual_seed(0)
    unet, text, tok, sconf = train.load_model(MODEL)
    n = 4
    prompts = ["a snowman with a blue hat"] * n + ["a snowman with a red hat"] * n
    x = train.sample(unet, text, tok, sconf, prompts, steps=20, cfg=4.0, seed=0)
    got = train.hat_colour(x)
    assert got[:n].count("blue") >= n - 1 and got[n:].count("red") >= n - 1, got
    # and in numbers: the top of the image is bluer for "blue" than for "red", and redder for "red"
    top = x[:, :, :10]
    blue = (top[:, 2] - top[:, :2].mean(1)).mean((1, 2))
    red = (top[:, 0] - top[:, 1:].mean(1)).mean((1, 2))
    assert blue[:n].mean() > blue[n:].mean() + 0.05
    assert red[n:].mean() > red[:n].mean() + 0.05


def test_demo_edit_turns_the_hat_blue_and_nothing_else(offline, tmp_path):
    from gendistill.core.scene import GaussianScene
    from gendistill.splat_edit.edit_config import load_edit_config
    from gendistill.splat_edit.editor import run_edit

    check = _tool("check_demo")
    cfg = load_edit_config(CONFIG, [f"out={tmp_path}", "report.turntable_frames=4"])
    result = run_edit(cfg, progress=False)
    before = GaussianScene.load_ply(cfg.scene)
    after = GaussianScene.load_ply(result.scene)
    mask = np.load(tmp_path / "masks3d" / "hat.npy")
    figures = check.demo_figures(before, after, edit_mask=mask)
    assert check.check(figures) == [], figures
    assert figures["changed_outside_edit_mask"] == 0 and figures["changed_outside_true_part"] == 0
    # 3D-GALP finds most of the hat and nothing else
    assert figures["edit_mask_missed"] < 0.2 * figures["hat_gaussians"]
    assert figures["edit_mask_false_positives"] == 0
    assert (tmp_path / "report.html").is_file()


def test_demo_from_the_prompt_alone_finds_and_edits_the_hat(offline, tmp_path):
    """demo_prompt_cpu.yaml: no mask files; the tiny model's attention for "hat" gives the 3D mask
    (fewer, smaller views here than `make demo` uses, to keep the test short)."""
    from gendistill.core.scene import GaussianScene
    from gendistill.splat_edit.edit_config import load_edit_config
    from gendistill.splat_edit.editor import run_edit

    check = _tool("check_demo")
    cfg = load_edit_config(ROOT / "configs/splat_edit/demo_prompt_cpu.yaml",
                           [f"out={tmp_path}", "report.turntable_frames=4", "steps=120",
                            "segment.mask_options={pipeline: assets/models/snowman-tiny, views: 12, size: 256}"])
    assert cfg.segment.mask_source == "attention" and "path" not in cfg.segment.mask_options
    result = run_edit(cfg, progress=False)
    before, after = GaussianScene.load_ply(cfg.scene), GaussianScene.load_ply(result.scene)
    figures = check.demo_figures(before, after, edit_mask=np.load(tmp_path / "masks3d" / "hat.npy"))
    assert check.check(figures, max_outside=0.02) == [], figures
    found = figures["edit_mask_gaussians"] - figures["edit_mask_false_positives"]
    iou = found / (figures["edit_mask_gaussians"] + figures["edit_mask_missed"])
    assert iou > 0.6 and figures["edit_mask_false_positives"] < 0.02 * figures["hat_gaussians"], figures
