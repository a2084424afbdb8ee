"""VideoREPA finetuning on the tiny CogVideoX config: outputs, losses, resume, LoRA export, two CPU processes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gendistill.config import ConfigError, load_config
from gendistill.testing.video import write_tiny_models
from gendistill.video_distill.finetune_config import FinetuneConfig
from gendistill.video_distill.student import diffusion_loss
from gendistill.video_distill.trainer import VideoREPATrainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "video_distill" / "tiny_cpu.yaml"
CLIPS = ROOT / "assets" / "clips"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("tiny-models"))


def tiny_cfg(tiny_models, out, *overrides):
    base = [f"output_dir={out}", f"model.pretrained={tiny_models['cogvideox']}",
            f"teacher.path={tiny_models['videomae']}", f"data.path={CLIPS}"]
    return load_config(FinetuneConfig, TINY, base + list(overrides))


def test_diffusion_loss_is_cogvideox_v_prediction_loss():
    from diffusers import CogVideoXDPMScheduler

    from gendistill.testing.video import tiny_scheduler

    sched = tiny_scheduler()
    assert isinstance(sched, CogVideoXDPMScheduler)
    g = torch.Generator().manual_seed(0)
    x0, noise, v = (torch.randn(2, 3, 4, 5, 5, generator=g) for _ in range(3))
    t = torch.tensor([10, 900])
    xt = sched.add_noise(x0, noise, t)
    ours = diffusion_loss(sched.alphas_cumprod, v, xt, x0, t)
    # the diffusers CogVideoX script: x0_hat = scheduler.get_velocity(v, x_t, t), weights 1 / (1 - alpha_bar_t)
    x0_hat = sched.get_velocity(v, xt, t)
    w = (1 / (1 - sched.alphas_cumprod[t])).view(-1, 1, 1, 1, 1)
    ref = (w * (x0_hat - x0) ** 2).reshape(2, -1).mean(1).mean()
    torch.testing.assert_close(ours, ref.float())
    # the true v gives x0 back exactly: zero loss
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    v_true = a.sqrt() * noise - (1 - a).sqrt() * x0
    assert float(diffusion_loss(sched.alphas_cumprod, v_true, xt, x0, t)) < 1e-9


def test_tiny_run_writes_checkpoints_validation_and_export(tiny_models, tmp_path):
    from diffusers import CogVideoXTransformer3DModel

    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_models, out, "max_steps=6", "checkpoint.every=2", "checkpoint.keep=2", "validation.every=3")
    trainer = VideoREPATrainer(cfg)
    summary = trainer.train()
    assert summary["step"] == 6 and len(summary["history"]) == 6
    for rec in summary["history"]:
        assert all(np.isfinite(rec[k]) for k in ("loss", "diffusion", "align"))
        assert rec["align"] > 0 and rec["diffusion"] > 0
        assert rec["loss"] == pytest.approx(rec["diffusion"] + 0.5 * rec["align"], rel=1e-5)
    # the last two checkpoints kept, no temporary folders left
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]
    vids = sorted(p.name for p in (out / "validation").glob("*.mp4"))
    assert vids == ["step-000003_prompt-00.mp4", "step-000006_prompt-00.mp4"]
    from gendistill.core.media import read_video

    assert read_video(out / "validation" / vids[0]).shape == (9, 32, 32, 3)
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    # full-finetune export: a transformer folder that from_pretrained loads, equal to the trained weights
    loaded = CogVideoXTransformer3DModel.from_pretrained(out / "export" / "transformer")
    trained = trainer.accelerator.unwrap_model(trainer.student).transformer.state_dict()
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, trained[k])
    base = CogVideoXTransformer3DModel.from_pretrained(tiny_models["cogvideox"], subfolder="transformer")
    assert any(not torch.equal(v, base.state_dict()[k]) for k, v in loaded.state_dict().items())
    # the heads load back as diffusers models, equal to the trained ones
    from gendistill.core.align import GridAligner, Projector

    student = trainer.accelerator.unwrap_model(trainer.student)
    projector = Projector.from_pretrained(out / "export" / "projector")
    aligner = GridAligner.from_pretrained(out / "export" / "aligner")
    assert projector.config.d_out == 16 and projector.config.d_in == 32  # transformer width 32 -> teacher width 16
    for mine, loaded in ((student.projector, projector), (student.aligner, aligner)):
        for k, v in loaded.state_dict().items():
            torch.testing.assert_close(v, mine.state_dict()[k].float())
    x = torch.randn(1, 3, 6, 9, 16)
    torch.testing.assert_close(aligner(x, (2, 2, 3)), student.aligner.float()(x, (2, 2, 3)))
    from gendistill.video_distill.heads import heads_state_dict

    assert {"projector.0.weight", "projector.4.weight", "aligner.conv.weight"} <= set(heads_state_dict(out / "export"))


def test_trd_falls_on_a_fixed_batch(tiny_models, tmp_path):
    cfg = tiny_cfg(tiny_models, tmp_path / "run", "max_steps=30", "align.proj_coeff=1.0", "optim.warmup_steps=0",
                   "gradient_checkpointing=false")
    trainer = VideoREPATrainer(cfg)
    batch = next(iter(trainer._make_loader(0)))

    def trd_at_fixed_noise():
        with torch.no_grad():
            return np.mean([float(trainer.compute_losses(batch, torch.Generator().manual_seed(s))["align"])
                            for s in range(4)])

    before = trd_at_fixed_noise()
    trds = [trainer.training_step(batch)["align"] for _ in range(30)]
    after = trd_at_fixed_noise()
    assert np.isfinite(trds).all()
    print(f"TRD at fixed noise: before {before:.4f}, after {after:.4f}")
    assert after < 0.7 * before, (before, after)
    assert np.mean(trds[-5:]) < np.mean(trds[:5])


@pytest.mark.slow
@pytest.mark.parametrize("training_type", ["sft", "lora"])
def test_resume_at_step_10_matches_uninterrupted_run(tiny_models, tmp_path, training_type):
    common = ("checkpoint.every=10", "validation.every=0", "export=false", f"training_type={training_type}")
    full = VideoREPATrainer(tiny_cfg(tiny_models, tmp_path / "a", "max_steps=20", *common))
    full.train()
    VideoREPATrainer(tiny_cfg(tiny_models, tmp_path / "b", "max_steps=10", *common)).train()
    resumed = VideoREPATrainer(tiny_cfg(tiny_models, tmp_path / "b", "max_steps=20", "resume_from_checkpoint=latest",
                                        *common))
    assert resumed.step == 10 and resumed.position == 10
    resumed.train()
    a = load_file(tmp_path / "a" / "checkpoints" / "checkpoint-20" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "checkpoint-20" / "model.safetensors")
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # and the run really moved between step 10 and 20
    a10 = load_file(tmp_path / "a" / "checkpoints" / "checkpoint-10" / "model.safetensors")
    assert any(not torch.equal(a10[k], a[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))  # each step logged once


def test_a_resume_drops_the_log_of_steps_it_runs_again(tmp_path):
    from gendistill.video_distill.checkpoints import drop_log_after

    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 0.1}) + "\n" for s in range(1, 14)))  # crashed at 13
    assert drop_log_after(log, 10) == 3
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == list(range(1, 11))
    assert drop_log_after(log, 10) == 0 and drop_log_after(tmp_path / "none.jsonl", 3) == 0


def test_lora_export_loads_into_pipeline_with_its_scale(tiny_models, tmp_path):
    from diffusers import CogVideoXPipeline

    out = tmp_path / "lora"
    cfg = tiny_cfg(tiny_models, out, "training_type=lora", "max_steps=3", "optim.lr=3e-2", "optim.warmup_steps=0",
                   "checkpoint.every=0", "validation.every=0", "lora.rank=4", "lora.alpha=2")
    trainer = VideoREPATrainer(cfg)
    trainer.train()
    export = out / "export"
    assert (export / "pytorch_lora_weights.safetensors").is_file()
    lora_keys = load_file(export / "pytorch_lora_weights.safetensors").keys()
    assert all(k.startswith("transformer.") and "lora_" in k for k in lora_keys)
    assert any("to_out.0" in k for k in lora_keys)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 4, 8, 8, generator=g)
    text = torch.randn(1, 16, 32, generator=g)
    t = torch.tensor([500])

    def run(transformer):
        with torch.no_grad():
            return transformer(hidden_states=x, encoder_hidden_states=text, timestep=t, return_dict=False)[0]

    pipe = CogVideoXPipeline.from_pretrained(tiny_models["cogvideox"])
    plain = run(pipe.transformer)
    pipe.load_lora_weights(export)
    with_lora = run(pipe.transformer)
    trained = run(trainer.accelerator.unwrap_model(trainer.student).transformer.eval())
    assert (with_lora - plain).abs().max() > 1e-4  # the LoRA changes the output...
    torch.testing.assert_close(with_lora, trained, rtol=1e-4, atol=1e-5)  # ...exactly as trained (alpha / rank)
    # `gendistill generate --lora` loads it the same way (folder or file)
    from gendistill.video_distill.generate import load_video_pipeline

    for lora in (export, export / "pytorch_lora_weights.safetensors"):
        torch.testing.assert_close(run(load_video_pipeline(tiny_models["cogvideox"], lora=lora).transformer), trained,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", [["align.loss=none"],
                                     ["align.loss=repa", "align.downsampler=area", "align.drop_first_frame=false"]])
def test_plain_and_repa_variants_run(tiny_models, tmp_path, variant):
    cfg = tiny_cfg(tiny_models, tmp_path / "run", "max_steps=2", "checkpoint.every=0", "validation.every=0", *variant)
    trainer = VideoREPATrainer(cfg)
    summary = trainer.train()
    last = summary["history"][-1]
    if cfg.align.loss == "none":
        assert trainer.teacher is None and last["align"] == 0.0 and last["loss"] == last["diffusion"]
        assert not (tmp_path / "run" / "export" / "projector").exists()
    else:
        assert -1.0 <= last["align"] <= 1.0 and last["loss"] == pytest.approx(last["diffusion"] + 0.5 * last["align"])


def test_bad_input_messages(tiny_models, tmp_path):
    with pytest.raises(ConfigError, match="optim.lrr"):
        tiny_cfg(tiny_models, tmp_path, "optim.lrr=1")
    cfg = tiny_cfg(tiny_models, tmp_path, "model.pretrained=" + str(tmp_path / "nowhere"), "model.tiny=false")
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
        VideoREPATrainer(cfg)
    with pytest.raises(ValueError, match="align_layer=7 but the transformer has 3 blocks"):
        VideoREPATrainer(tiny_cfg(tiny_models, tmp_path, "align.align_layer=7"))
    with pytest.raises(ValueError, match="4k\\+1"):
        VideoREPATrainer(tiny_cfg(tiny_models, tmp_path, "data.num_frames=8"))


def test_a_bad_data_path_fails_before_any_model_loads(tiny_models, tmp_path, monkeypatch):
    from gendistill.video_distill import trainer as T

    def no_models(*a, **k):
        raise AssertionError("a model was loaded before the data path was checked")

    monkeypatch.setattr(T.VideoREPATrainer, "_load_models", no_models)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        VideoREPATrainer(tiny_cfg(tiny_models, tmp_path, f"data.path={tmp_path / 'nowhere'}"))


def test_cli_finetune_skips_bad_clips_and_goes_on(tiny_models, tmp_path, capsys):
    """A manifest with a row pointing nowhere and a too-short video: both skipped, counted, the run completes."""
    import shutil

    from gendistill.core.media import write_video
    from gendistill.cli import main

    data = tmp_path / "data"
    data.mkdir()
    for name in ("red_throw_right", "green_drop"):
        shutil.copy(CLIPS / f"{name}.mp4", data / f"{name}.mp4")
    write_video(data / "short.mp4", np.zeros((4, 32, 32, 3), np.uint8))
    (data / "train.csv").write_text("video,caption\nred_throw_right.mp4,a red ball\nmissing.mp4,nothing\n"
                                    "short.mp4,too short\ngreen_drop.mp4,a green ball\n")
    rc = main(["finetune", "--config", str(TINY), f"output_dir={tmp_path / 'out'}",
               f"model.pretrained={tiny_models['cogvideox']}", f"teacher.path={tiny_models['videomae']}",
               f"data.path={data / 'train.csv'}", "max_steps=4", "checkpoint.every=0", "validation.every=0",
               "export=false", "data.shuffle=false"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "skipped 1 unreadable clip(s) and 1 bad manifest entries" in text
    log = [json.loads(line) for line in (tmp_path / "out" / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and log[-1]["skipped"] == 1


def test_cached_features_are_reused_and_keyed_by_settings(tiny_models, tmp_path):
    cache = tmp_path / "cache"
    common = ("data.cache=true", f"data.cache_dir={cache}", "checkpoint.every=0", "validation.every=0",
              "export=false", "max_steps=2")
    first = VideoREPATrainer(tiny_cfg(tiny_models, tmp_path / "a", *common))
    n_files = len(list(cache.rglob("*.safetensors")))
    assert n_files == 4
    entry = first.dataset[0]
    assert entry["latent_params"].shape == (8, 3, 8, 8)  # 2 x 4 channels, 3 latent frames, 8 x 8
    assert entry["teacher"].shape == (4, 4, 4, 16)
    assert entry["prompt_embeds"].shape == (16, 32)
    first.train()
    VideoREPATrainer(tiny_cfg(tiny_models, tmp_path / "b", *common))  # same settings: nothing new
    assert len(list(cache.rglob("*.safetensors"))) == n_files
    VideoREPATrainer(tiny_cfg(tiny_models, tmp_path / "c", *common, "teacher.frame_start=0"))  # teacher changed
    assert len(list(cache.rglob("*.safetensors"))) == 2 * n_files


_RANK_WEIGHTS = """
import sys
from safetensors.torch import save_file
from gendistill import cli
from gendistill.video_distill import trainer as T

train = T.VideoREPATrainer.train
def train_and_dump(self):
    out = train(self)
    sd = self.accelerator.unwrap_model(self.student).state_dict()
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, f"{self.out}/weights_rank{self.rank}.safetensors")
    return out
T.VideoREPATrainer.train = train_and_dump
sys.exit(cli.main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_processes_keep_identical_weights(tiny_models, tmp_path):
    script = tmp_path / "run_rank.py"
    script.write_text(_RANK_WEIGHTS)
    out = tmp_path / "ddp"
    args = ["finetune", "--config", str(TINY), f"output_dir={out}", f"model.pretrained={tiny_models['cogvideox']}",
            f"teacher.path={tiny_models['videomae']}", f"data.path={CLIPS}", "max_steps=3", "checkpoint.every=3",
            "validation.every=3", "validation.prompts=[a red ball,a blue ball]",
            "data.buckets=[[9,32,32],[9,32,48]]"]  # assigned on the main process, sent to the other
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for attempt in range(2):  # a gloo rendezvous occasionally aborts on CPU: retry once on a fresh port
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(_free_port()), str(script), *args],
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        if proc.returncode == 0:
            break
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0, w1 = (load_file(out / f"weights_rank{r}.safetensors") for r in (0, 1))
    assert w0.keys() == w1.keys()
    for k in w0:
        torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=0)
    ckpt = out / "checkpoints" / "checkpoint-3"
    assert (ckpt / "trainer_state_0.pt").is_file() and (ckpt / "trainer_state_1.pt").is_file()
    assert json.loads((ckpt / "trainer_state.json").read_text())["num_processes"] == 2
    # the two validation prompts were split across the processes, both written
    assert sorted(p.name for p in (out / "validation").glob("*.mp4")) == [
        "step-000003_prompt-00.mp4", "step-000003_prompt-01.mp4"]
    assert (out / "export" / "transformer" / "config.json").is_file()
    assert len(json.loads((out / "cache" / "video_headers.json").read_text())) == len(list(CLIPS.glob("*.mp4")))


def test_rotary_transformer_like_cogvideox_5b_trains_and_validates(tmp_path):
    models = write_tiny_models(tmp_path / "models", rotary=True)
    cfg = tiny_cfg(models, tmp_path / "run", "max_steps=2", "checkpoint.every=0", "validation.every=2",
                   "training_type=lora")
    trainer = VideoREPATrainer(cfg)
    assert trainer.transformer.config.use_rotary_positional_embeddings
    summary = trainer.train()
    assert all(np.isfinite(r["loss"]) for r in summary["history"])
    assert (tmp_path / "run" / "validation" / "step-000002_prompt-00.mp4").is_file()


class _DeepSpeedWarmupDecayLR:
    """DeepSpeed's WarmupDecayLR as documented (warmup_type "log", warmup_min_lr 0), stepped by its
    engine after every optimizer step: a counter from -1 (lr 0), log(i + 1) / log(W) during the
    warmup, then (T - i) / (T - W)."""

    def __init__(self, max_lr, warmup, total):
        self.max_lr, self.warmup, self.total, self.i = max_lr, max(2, warmup), total, -1

    def lr(self):
        if self.i < 0:
            return 0.0
        if self.i < self.warmup:
            return self.max_lr * np.log(self.i + 1) / np.log(self.warmup)
        return self.max_lr * max(0.0, (self.total - self.i) / (self.total - self.warmup))

    def step(self):
        self.i += 1


@pytest.mark.parametrize("calls_per_step", [1, 2])
def test_as_run_schedule_is_deepspeeds_warmup_decay(calls_per_step):
    from gendistill.video_distill.lr_schedules import build_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1e-4)
    ours = build_scheduler("warmup_decay_log", opt, warmup_steps=10, total_steps=40, calls_per_step=calls_per_step)
    ref = _DeepSpeedWarmupDecayLR(1e-4, 10, 40)
    seen = []
    for _ in range(45):
        seen.append((opt.param_groups[0]["lr"], ref.lr()))
        opt.step()
        for _ in range(calls_per_step):  # accelerate steps a prepared scheduler once per process
            ours.step()
        ref.step()
    np.testing.assert_allclose([a for a, _ in seen], [b for _, b in seen], rtol=1e-12, atol=1e-15)
    assert seen[0][0] == seen[1][0] == 0.0 and max(a for a, _ in seen) == pytest.approx(1e-4)
    assert seen[41][0] == 0.0  # decayed to 0 at total_steps


def test_published_configs_train_as_run():
    """optim.preset as_run: betas (0.9, 0.999) and DeepSpeed's schedule; teacher in fp32; VideoREPA's
    stride sampling; the 5B run one epoch of openvid_6w4 (2000 steps at 8 x 4)."""
    from gendistill.video_distill.finetune_config import check_config

    for name in ("videorepa_2b_sft", "videorepa_5b_lora", "repa_baseline"):
        cfg = load_config(FinetuneConfig, ROOT / "configs" / "video_distill" / f"{name}.yaml")
        check_config(cfg)
        assert cfg.optim.betas == [0.9, 0.999] and cfg.optim.lr_scheduler == "warmup_decay_log", name
        assert cfg.teacher.dtype == "float32" and cfg.data.frame_sampling == "stride", name
    assert load_config(FinetuneConfig, ROOT / "configs" / "video_distill" / "videorepa_5b_lora.yaml").max_steps == 2000
    scripts = load_config(FinetuneConfig, TINY, ["optim.preset=scripts"])
    assert scripts.optim.betas == [0.9, 0.95] and scripts.optim.lr_scheduler == "constant_with_warmup"
    with pytest.raises((ConfigError, ValueError), match="optim.preset"):
        load_config(FinetuneConfig, TINY, ["optim.preset=paper"])
    with pytest.raises(ValueError, match="optim.lr_scheduler"):
        check_config(load_config(FinetuneConfig, TINY, ["optim.lr_scheduler=warmup_decay"]))


def test_teacher_runs_in_float32_under_mixed_precision(tiny_models, tmp_path):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        cfg = tiny_cfg(tiny_models, tmp_path / "out", "mixed_precision=bf16", "teacher.dtype=float32")
        trainer = VideoREPATrainer(cfg, data=False)
        assert trainer.weight_dtype == torch.bfloat16 and trainer.teacher.dtype == torch.float32
        video = torch.rand(1, cfg.data.num_frames, 3, cfg.data.height, cfg.data.width)
        assert trainer._encode_clip_batch(video, ["a ball"])["teacher"].dtype == torch.float32
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_released_videorepa_transformer_and_heads_load(tiny_models, tmp_path):
    """A transformer saved as VideoREPA releases it (CogVideoXTransformer3DModelAlign: the heads inside its
    state dict as projectors.0.* and downsampler_cogvideo_output.*) loads into ours: the transformer
    through from_pretrained, the heads through align.heads."""
    import shutil

    from accelerate.state import AcceleratorState
    from safetensors.torch import save_file

    from gendistill.video_distill.heads import OFFICIAL_KEYS

    release = tmp_path / "cogvideox-2b-infer"
    shutil.copytree(tiny_models["cogvideox"], release)
    AcceleratorState._reset_state(reset_partial_state=True)
    ours = VideoREPATrainer(tiny_cfg(tiny_models, tmp_path / "a"), data=False)
    g = torch.Generator().manual_seed(3)
    official = {}
    for key, value in ours.student.state_dict().items():
        for off, mine in OFFICIAL_KEYS.items():
            if key.startswith(mine):
                official[off + key[len(mine):]] = torch.randn(value.shape, generator=g)
    assert len(official) == 8  # three Linear layers and the conv, weight and bias each
    weights = next((release / "transformer").glob("*.safetensors"))
    save_file({**load_file(str(weights)), **official}, str(weights))
    config = json.loads((release / "transformer" / "config.json").read_text())
    config.update(_class_name="CogVideoXTransformer3DModelAlign", align_dims=[16], projector_dim=32)
    (release / "transformer" / "config.json").write_text(json.dumps(config))

    AcceleratorState._reset_state(reset_partial_state=True)
    cfg = tiny_cfg(tiny_models, tmp_path / "b", f"model.pretrained={release}",
                   f"align.heads={release / 'transformer'}")
    trainer = VideoREPATrainer(cfg, data=False)
    state = trainer.student.state_dict()
    for off, mine in OFFICIAL_KEYS.items():
        for key in [k for k in official if k.startswith(off)]:
            torch.testing.assert_close(state[mine + key[len(off):]].float(), official[key])
    torch.testing.assert_close(state["transformer.proj_out.weight"].float(),
                               ours.student.state_dict()["transformer.proj_out.weight"].float())
    AcceleratorState._reset_state(reset_partial_state=True)
    bad = tiny_cfg(tiny_models, tmp_path / "c", f"align.heads={tiny_models['cogvideox']}/transformer")
    with pytest.raises(ValueError, match="no alignment heads"):
        VideoREPATrainer(bad, data=False)


@pytest.mark.parametrize("training_type", ["sft", "lora"])
def test_new_modules_do_not_depend_on_what_ran_before(tmp_path, training_type):
    """The projector, aligner and LoRA adapters start from the config's seed: the same on the first run,
    which builds and writes the tiny models (drawing random numbers), and on the next, which loads them."""
    from accelerate.state import AcceleratorState

    models = {"pretrained": tmp_path / "models" / "cog", "teacher": tmp_path / "models" / "vmae"}
    heads = []
    for run in ("first", "second"):
        AcceleratorState._reset_state(reset_partial_state=True)
        cfg = load_config(FinetuneConfig, TINY, [f"output_dir={tmp_path / run}", f"model.pretrained={models['pretrained']}",
                                                 f"teacher.path={models['teacher']}", "model.tiny=true",
                                                 f"training_type={training_type}", "lora.rank=4"])
        trainer = VideoREPATrainer(cfg, data=False)
        state = trainer.accelerator.unwrap_model(trainer.student).state_dict()
        heads.append({k: v.detach().clone() for k, v in state.items()
                      if k.startswith(("projector", "aligner")) or "lora" in k})
    assert heads[0].keys() == heads[1].keys() and len(heads[0]) >= 8
    for k in heads[0]:
        torch.testing.assert_close(heads[0][k], heads[1][k], rtol=0, atol=0)


def test_nonfinite_steps_are_skipped_before_the_optimizer_and_stop_the_run(tiny_models, tmp_path, monkeypatch):
    """A NaN loss skips the optimizer step (the weights keep their values: the check runs before
    optimizer.step), is counted in the log, and max_nonfinite_steps in a row stop the run."""
    cfg = tiny_cfg(tiny_models, tmp_path / "run", "max_steps=6", "checkpoint.every=0", "validation.every=0",
                   "export=false", "max_nonfinite_steps=3")
    trainer = VideoREPATrainer(cfg)
    real = trainer.compute_losses
    calls = {"n": 0}

    def nan_at_two(batch, generator=None):
        losses = real(batch, generator)
        calls["n"] += 1
        if calls["n"] == 2:
            losses = {**losses, "loss": losses["loss"] * float("nan")}
        return losses

    monkeypatch.setattr(trainer, "compute_losses", nan_at_two)
    weights = {}

    def snapshot(step):
        weights[step] = {k: v.detach().clone() for k, v in trainer.student.state_dict().items() if "projector" in k}

    real_step = trainer.training_step

    def watched(batch):
        snapshot(trainer.step)
        return real_step(batch)

    monkeypatch.setattr(trainer, "training_step", watched)
    summary = trainer.train()
    assert trainer.nonfinite_steps == 1 and summary["history"][-1]["skipped_nonfinite"] == 1
    assert all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1])  # step 2 skipped: no update
    assert any(not torch.equal(weights[2][k], weights[3][k]) for k in weights[2])  # step 3 trained again
    always = tiny_cfg(tiny_models, tmp_path / "run2", "max_steps=6", "checkpoint.every=0", "validation.every=0",
                      "export=false", "max_nonfinite_steps=3")
    bad = VideoREPATrainer(always)
    real_bad = bad.compute_losses
    monkeypatch.setattr(bad, "compute_losses", lambda batch, generator=None: {
        k: v * float("inf") for k, v in real_bad(batch, generator).items()})
    with pytest.raises(FloatingPointError, match="3 optimizer steps in a row had NaN/inf"):
        bad.train()


def test_sigterm_checkpoints_then_exits_143(tiny_models, tmp_path):
    """Preemption: SIGTERM to a running `gendistill finetune` writes a checkpoint at the current step
    and exits 143; resuming from it continues at that step."""
    import signal
    import subprocess
    import time

    out = tmp_path / "run"
    args = ["--config", str(TINY), f"output_dir={out}", f"model.pretrained={tiny_models['cogvideox']}",
            f"teacher.path={tiny_models['videomae']}", f"data.path={CLIPS}", "checkpoint.every=0",
            "validation.every=0", "export=false"]
    proc = subprocess.Popen([sys.executable, "-m", "gendistill", "finetune", "--no-progress", *args,
                             "max_steps=100000"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    log = out / "logs" / "train_log.jsonl"
    try:
        deadline = time.time() + 120
        while (not log.is_file() or len(log.read_text().splitlines()) < 2) and proc.poll() is None \
                and time.time() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr[-2000:]
    assert "SIGTERM: checkpoint at step" in stdout
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").is_file()
    step = int(checkpoints[0].name.split("-")[1])
    assert step >= 2
    resumed = VideoREPATrainer(load_config(FinetuneConfig, TINY, [*args[2:], f"max_steps={step + 1}",
                                                                  "resume_from_checkpoint=latest"]))
    assert resumed.step == step and resumed.train()["step"] == step + 1
