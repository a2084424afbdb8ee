"""Memory savers of `gendistill finetune` on the tiny CogVideoX: 8-bit AdamW (with a resume), fp8 layerwise
casting, group offloading, the CPU-offloaded teacher, and the errors of bad settings."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gendistill.config import ConfigError, load_config
from gendistill.testing.video import write_tiny_models
from gendistill.video_distill.finetune_config import FinetuneConfig, check_config, check_engine
from gendistill.video_distill.trainer import VideoREPATrainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "video_distill" / "tiny_cpu.yaml"
CLIPS = ROOT / "assets" / "clips"
QUICK = ("max_steps=2", "checkpoint.every=0", "validation.every=0", "export=false", "data.shuffle=false",
         "optim.warmup_steps=0", "report_to=none")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("tiny-models"))


def tiny_cfg(tiny_models, out, *overrides):
    base = [f"output_dir={out}", f"model.pretrained={tiny_models['cogvideox']}",
            f"teacher.path={tiny_models['videomae']}", f"data.path={CLIPS}", *QUICK]
    return load_config(FinetuneConfig, TINY, base + list(overrides))


def losses(summary) -> list[float]:
    return [r["loss"] for r in summary["history"]]


@pytest.fixture(scope="module")
def plain_losses(tiny_models, tmp_path_factory):
    """The losses of 2 steps with no saver (features encoded every step)."""
    return losses(VideoREPATrainer(tiny_cfg(tiny_models, tmp_path_factory.mktemp("plain"))).train())


def test_adamw8bit_resumes_like_an_uninterrupted_run(tiny_models, tmp_path):
    """torchao's AdamW8bit: its quantized moments go into the checkpoint and come back; 2 + 2 resumed steps give
    the weights of 4 uninterrupted ones exactly (the eager CPU update is deterministic)."""
    pytest.importorskip("torchao")
    from torchao.optim.subclass_8bit import OptimState8bit

    common = ("optim.optimizer=adamw8bit", "checkpoint.every=2", "max_steps=4")
    full = VideoREPATrainer(tiny_cfg(tiny_models, tmp_path / "a", *common))
    full.train()
    states = [s for st in full.optimizer.optimizer.state.values() for s in st.values()]
    assert any(isinstance(s, OptimState8bit) for s in states)  # the ff layers (4096 values) are quantized
    half = VideoREPATrainer(tiny_cfg(tiny_models, tmp_path / "b", *common[:-1], "max_steps=2")).train()
    assert half["step"] == 2
    resumed = VideoREPATrainer(tiny_cfg(tiny_models, tmp_path / "b", *common, "resume_from_checkpoint=latest"))
    assert resumed.step == 2
    restored = [s for st in resumed.optimizer.optimizer.state.values() for s in st.values()]
    assert any(isinstance(s, OptimState8bit) for s in restored)
    resumed.train()
    a = load_file(tmp_path / "a" / "checkpoints" / "checkpoint-4" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "checkpoint-4" / "model.safetensors")
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_layerwise_casting_stores_fp8_and_computes_in_float32(tiny_models, tmp_path, monkeypatch):
    """LoRA: the transformer's frozen base, VAE, text encoder and teacher stored in float8_e4m3fn, each cast
    layer computing in float32; adapters, heads, norms and patch embeddings stay float32."""
    cfg = tiny_cfg(tiny_models, tmp_path / "run", "training_type=lora", "lora.rank=4",
                   "model.layerwise_casting=float8_e4m3fn")
    trainer = VideoREPATrainer(cfg)
    fp8 = torch.float8_e4m3fn
    tr = trainer.accelerator.unwrap_model(trainer.student).transformer
    block = tr.transformer_blocks[0]
    assert block.attn1.to_q.base_layer.weight.dtype == fp8 and block.ff.net[2].weight.dtype == fp8
    assert block.attn1.to_q.lora_A["default"].weight.dtype == torch.float32
    assert block.norm1.linear.weight.dtype == torch.float32 and tr.patch_embed.proj.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in trainer.params)
    assert trainer.vae.encoder.down_blocks[0].resnets[0].conv1.conv.weight.dtype == fp8
    assert trainer.text_encoder.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == fp8
    assert trainer.teacher.model.encoder.layer[0].attention.attention.query.weight.dtype == fp8
    assert trainer.teacher.dtype == torch.float32 and trainer.vae.dtype == torch.float32

    layer, seen, linear = block.attn1.to_q.base_layer, [], torch.nn.functional.linear

    def watched(x, weight, bias=None):
        seen.append((weight is layer.weight, weight.dtype, x.dtype))
        return linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", watched)
    summary = trainer.train()
    monkeypatch.undo()
    assert (True, torch.float32, torch.float32) in seen  # the fp8 layer ran in float32...
    assert {dtype for _, dtype, _ in seen} == {torch.float32}  # ...as every linear layer did
    assert layer.weight.dtype == fp8  # and is stored in fp8 again
    assert all(torch.isfinite(torch.tensor(losses(summary))))


@pytest.mark.parametrize("kind", ["block_level", "leaf_level"])
def test_group_offload_gives_the_losses_of_no_offload(tiny_models, tmp_path, plain_losses, kind):
    trainer = VideoREPATrainer(tiny_cfg(tiny_models, tmp_path / "run", f"model.group_offload={kind}"))
    for model in (trainer.vae, trainer.text_encoder):
        hooked = [m for m in model.modules() if hasattr(m, "_diffusers_hook")
                  and m._diffusers_hook.get_hook("group_offloading") is not None]
        assert hooked and all(p.device.type == "cpu" for p in model.parameters())
    got = losses(trainer.train())
    assert got == pytest.approx(plain_losses, rel=1e-5, abs=1e-6)


def test_offloaded_teacher_is_not_loaded_when_every_feature_is_cached(tiny_models, tmp_path, plain_losses):
    from gendistill.video_distill.teachers import OffloadedTeacher

    common = ("teacher.offload=true", "data.cache=true", f"data.cache_dir={tmp_path / 'cache'}")
    first = VideoREPATrainer(tiny_cfg(tiny_models, tmp_path / "a", *common))  # empty cache: the teacher fills it
    assert isinstance(first.teacher, OffloadedTeacher) and first.teacher.loaded and first.teacher.calls == 4
    assert first.teacher.module.model.device.type == "cpu"  # moved back after the precompute
    assert losses(first.train()) == pytest.approx(plain_losses, rel=1e-5, abs=1e-6)
    second = VideoREPATrainer(tiny_cfg(tiny_models, tmp_path / "b", *common))
    assert second.teacher.hidden_size == 16  # read from the cached features
    summary = second.train()
    assert not second.teacher.loaded and second.teacher.calls == 0
    assert losses(summary) == pytest.approx(plain_losses, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("override, message", [
    ("optim.optimizer=sgd", "optim.optimizer must be one of"),
    ("model.layerwise_casting=fp8", "model.layerwise_casting must be null or one of"),
    ("model.group_offload=model", "model.group_offload must be null or one of"),
])
def test_a_bad_saver_setting_fails_before_any_model_loads(tiny_models, tmp_path, monkeypatch, override, message):
    from gendistill.video_distill import trainer as T

    def no_models(*a, **k):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(T.VideoREPATrainer, "_load_models", no_models)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        VideoREPATrainer(tiny_cfg(tiny_models, tmp_path, override))


def test_saver_errors_name_the_key(tmp_path, monkeypatch):
    from gendistill.video_distill import finetune_config as F

    with pytest.raises(ConfigError, match="teacher.offload"):
        load_config(FinetuneConfig, TINY, ["teacher.offload=sometimes"])
    monkeypatch.setattr(F, "_installed", lambda name: name != "torchao")
    with pytest.raises(ValueError, match=r"optim.optimizer=adamw8bit needs torchao: pip install torchao"):
        check_config(load_config(FinetuneConfig, TINY, ["optim.optimizer=adamw8bit"]))
    monkeypatch.undo()
    eight = load_config(FinetuneConfig, TINY, ["optim.optimizer=adamw8bit"])
    for engine in ("DEEPSPEED", "FSDP"):
        with pytest.raises(ValueError, match="optim.optimizer=adamw8bit is not supported under"):
            check_engine(eight, engine)
    check_engine(eight, "MULTI_GPU")
    fp8_lora = load_config(FinetuneConfig, TINY, ["model.layerwise_casting=float8_e5m2", "training_type=lora"])
    with pytest.raises(ValueError, match="model.layerwise_casting=float8_e5m2 with training_type=lora"):
        check_engine(fp8_lora, "DEEPSPEED")
    check_engine(load_config(FinetuneConfig, TINY, ["model.layerwise_casting=float8_e5m2"]), "DEEPSPEED")  # sft: frozen parts only
    offload = load_config(FinetuneConfig, TINY, ["model.group_offload=leaf_level", "teacher.offload=true"])
    for engine in ("DEEPSPEED", "FSDP", "MULTI_GPU"):
        check_engine(offload, engine)  # frozen models outside the engine: any engine


def test_plan_counts_the_savers(tmp_path):
    """`gendistill plan`: fp8 frozen weights, 8-bit states and the models kept on the CPU lower the peak."""
    from gendistill.plan import plan_config
    from gendistill.testing.video import tiny_pipeline, tiny_videomae

    tiny_pipeline().save_pretrained(tmp_path / "cog")
    tiny_videomae().save_pretrained(tmp_path / "vmae")
    for f in tmp_path.rglob("*"):
        if f.suffix in (".safetensors", ".bin"):
            f.unlink()
    base = [f"model.pretrained={tmp_path / 'cog'}", f"teacher.path={tmp_path / 'vmae'}"]
    plain = plan_config(TINY, base)
    saved = plan_config(TINY, [*base, "optim.optimizer=adamw8bit", "model.group_offload=block_level",
                               "teacher.offload=true"])
    assert saved["memory"]["optimizer_state"] < plain["memory"]["optimizer_state"]
    assert saved["peak_memory_bytes"] == sum(saved["memory"].values()) < plain["peak_memory_bytes"]
    assert saved["offloaded_bytes"] > 0
    assert saved["memory"]["parameters"] == plain["memory"]["parameters"] - saved["offloaded_bytes"]
    fp8 = plan_config(TINY, [*base, "model.layerwise_casting=float8_e4m3fn"])
    assert fp8["models"]["vae"]["dtype"] == fp8["models"]["text_encoder"]["dtype"] == "float8_e4m3fn"
    assert fp8["memory"]["parameters"] < plain["memory"]["parameters"]
