"""`gendistill plan`: a full-size step under fake tensors; checked against real steps of tiny models."""

import json
from pathlib import Path

import pytest
import torch

from gendistill.cli import main as cli_main
from gendistill.plan import measure_step, plan_config

ROOT = Path(__file__).resolve().parents[1]
TINY_FT = ROOT / "configs" / "video_distill" / "tiny_cpu.yaml"
TINY_EDIT = ROOT / "configs" / "splat_edit" / "tiny_cpu.yaml"


@pytest.fixture(scope="module")
def tiny_archs(tmp_path_factory):
    """Architecture-only folders (no weights) of the tiny CogVideoX, VideoMAE and SD3 pipelines."""
    from gendistill.testing.diffusion import tiny_sd3_pipeline
    from gendistill.testing.video import tiny_pipeline, tiny_videomae

    root = tmp_path_factory.mktemp("archs")
    tiny_pipeline().save_pretrained(root / "cog")
    tiny_videomae().save_pretrained(root / "vmae")
    tiny_sd3_pipeline().save_pretrained(root / "sd3")
    for f in root.rglob("*"):
        if f.suffix in (".safetensors", ".bin"):
            f.unlink()
    return root


def _finetune_overrides(archs):
    return [f"model.pretrained={archs / 'cog'}", f"teacher.path={archs / 'vmae'}"]


def test_plan_reports_models_memory_and_flops(tiny_archs, capsys):
    from gendistill.testing.video import tiny_pipeline

    code = cli_main(["plan", "--config", str(TINY_FT), "--json", *_finetune_overrides(tiny_archs)])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    real = tiny_pipeline()
    assert result["models"]["transformer"]["params"] == sum(p.numel() for p in real.transformer.parameters())
    assert result["models"]["transformer"]["trainable"] == result["models"]["transformer"]["params"]  # sft
    assert result["models"]["text_encoder"]["trainable"] == 0
    assert result["peak_memory_bytes"] == sum(result["memory"].values())
    assert result["memory"]["parameters"] > 0 and result["flops_per_step"] > 0
    assert set(result["gpus"]) >= {"A100-80GB", "H100", "H200", "L40S", "RTX4090"}


def test_lora_plan_trains_only_the_adapters(tiny_archs):
    result = plan_config(TINY_FT, [*_finetune_overrides(tiny_archs), "training_type=lora", "lora.rank=4"])
    t = result["models"]["transformer"]
    assert 0 < t["trainable"] < t["params"]


def _real_peak(cfg_overrides) -> int:
    """Tracked allocations of the same step run for real (the same tracker on real tensors)."""
    from gendistill.config import load_config
    from gendistill.video_distill.finetune_config import FinetuneConfig
    from gendistill.video_distill.trainer import VideoREPATrainer

    cfg = load_config(FinetuneConfig, TINY_FT, cfg_overrides)
    torch.manual_seed(0)
    trainer = VideoREPATrainer(cfg, data=False)
    trainer.student.train()
    d = cfg.data
    batch = {"video": torch.rand(cfg.batch_size, d.num_frames, 3, d.height, d.width),
             "caption": ["a ball bounces on the grass"] * cfg.batch_size, "skipped": []}
    modules = [trainer.student, trainer.text_encoder, trainer.vae, trainer.teacher]
    return measure_step(lambda: trainer.step_tensors(batch), modules, [trainer.optimizer])["peak_memory_bytes"]


@pytest.mark.parametrize("extra", [[], ["batch_size=2", "gradient_checkpointing=false"]], ids=["default", "b2-nockpt"])
def test_plan_memory_is_within_25_percent_of_a_real_step(tiny_archs, extra):
    from gendistill.testing.video import tiny_pipeline, tiny_videomae

    real_dir = tiny_archs / "real"
    if not real_dir.exists():
        tiny_pipeline().save_pretrained(real_dir / "cog")
        tiny_videomae().save_pretrained(real_dir / "vmae")
    measured = _real_peak([f"model.pretrained={real_dir / 'cog'}", f"teacher.path={real_dir / 'vmae'}", *extra])
    planned = plan_config(TINY_FT, [*_finetune_overrides(tiny_archs), *extra])["peak_memory_bytes"]
    assert abs(planned - measured) <= 0.25 * measured, (planned, measured)


def test_edit_plan_counts_the_guidance_models(tiny_archs):
    from gendistill.testing.diffusion import tiny_sd3_pipeline

    result = plan_config(TINY_EDIT, [f"guidance.model={tiny_archs / 'sd3'}", "guidance.tiny=null",
                                     "scene=assets/scenes/snowman.ply"])
    real = tiny_sd3_pipeline()
    assert result["kind"] == "edit"
    assert result["models"]["transformer"]["params"] == sum(p.numel() for p in real.transformer.parameters())
    assert result["models"]["transformer"]["trainable"] == 0
    assert result["models"]["gaussians"]["params"] > 0
    assert result["flops_per_step"] > 0 and result["peak_memory_bytes"] > 0


def test_plan_errors_are_clear(tiny_archs, capsys):
    code = cli_main(["plan", "--config", str(TINY_FT), "no_such_key=1"])
    assert code == 2 and "no_such_key" in capsys.readouterr().err
    code = cli_main(["plan", "--config", str(TINY_FT), "model.pretrained=nobody/nothing"])
    err = capsys.readouterr().err
    assert code == 2 and "configs/models/nobody/nothing" in err
    code = cli_main(["plan", "--config", str(TINY_FT), *_finetune_overrides(tiny_archs), "training_type=lora",
                     "lora.rank=100000"])
    assert code == 2 and "lora.rank=100000" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["plan", "--config", str(TINY_FT), "--gpu", "TPU9000"])
    assert "TPU9000" in capsys.readouterr().err


def test_dry_run_plans_the_command_line_instead_of_running_it(tiny_archs, tmp_path, capsys):
    out = tmp_path / "ft"
    code = cli_main(["finetune", "--config", str(TINY_FT), "--dry-run", f"output_dir={out}",
                     *_finetune_overrides(tiny_archs)])
    text = capsys.readouterr().out
    assert code == 0 and "peak memory" in text and "| transformer |" in text
    assert not out.exists()  # nothing trained, nothing written


# every shipped real config: its main model's published parameter count, and the H200 measurement of the
# same config at batch 1 (random weights, the real command's code; tools/measurements/full_size_h200.json)
SHIPPED = {
    "splat_edit/romap_sd3": ("transformer", 2_028_328_000),
    "splat_edit/sds_sd21": ("unet", 865_910_724),
    "splat_edit/ip2p": ("unet", 859_532_484),
    "video_distill/videorepa_2b_sft": ("transformer", 1_693_783_872),
    "video_distill/videorepa_5b_lora": ("transformer", 5_570_283_072),
    "video_distill/repa_baseline": ("transformer", 5_570_283_072),
}


@pytest.mark.fullsize
@pytest.mark.parametrize("config", sorted(SHIPPED))
def test_full_size_plan_of_every_shipped_config(config):
    """Each real config wired end to end at full size (hook indices, projector widths, the 13 x 30 x 45
    latent grid against the teacher's, T5 at its real sequence length, dtype mixes), and its planned peak
    within 20% of the peak measured on an H200."""
    path = ROOT / "configs" / f"{config}.yaml"
    result = plan_config(path, ["batch_size=1"])
    component, published = SHIPPED[config]
    m = result["models"][component]
    assert m["params"] - (m["trainable"] if "lora" in config or "repa_baseline" in config else 0) == published
    for name, encoder in result["models"].items():
        if name.startswith("text_encoder") and encoder["params"] > 10**9:
            assert encoder["params"] == 4_762_310_656  # T5-XXL, its embeddings tied
    if result["kind"] == "finetune":
        assert result["models"]["projector"]["trainable"] > 0
        frozen = m["params"] - m["trainable"]
        assert result["memory"].get("optimizer_state", 0) >= 2 * 4 * m["trainable"]  # AdamW, fp32 states
        assert frozen == 0 or "lora" in config or "repa_baseline" in config
    rows = json.loads((ROOT / "tools" / "measurements" / "full_size_h200.json").read_text())["rows"]
    name = config.split("/")[1]
    measured = next(r["peak_steps_gib"] for r in rows if r["config"] == name and r["shape"].endswith("batch 1"))
    assert abs(result["peak_memory_bytes"] / 2**30 - measured) <= 0.2 * measured, (result["peak_memory_bytes"], measured)
    assert result["gpus"]["H200"]["fits"]
