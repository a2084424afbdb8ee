"""The video half offline: the bundled tiny CogVideoX (assets/models/video_demo_base) makes moving balls of
the prompted colour, the bundled tiny VideoMAE loads as the `videomae` teacher, and the runner of
`make demo-video` (gendistill/video_distill/demo.py) goes end to end with tiny step counts."""

import json
from pathlib import Path

import numpy as np
import pytest

from gendistill.video_distill import demo

ROOT = Path(__file__).resolve().parents[1]
BASE, TEACHER = demo.BASE_MODEL, demo.TEACHER_MODEL


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_bundled_video_models_are_small_and_load(offline):
    import torch
    from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline, CogVideoXTransformer3DModel

    from gendistill.video_distill.teachers import load_teacher

    files = [f for folder in (BASE, TEACHER) for f in folder.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 25e6
    assert not [f for f in files if f.suffix == ".bin"] and [f for f in files if f.suffix == ".safetensors"]
    assert (BASE / "README.md").is_file() and (TEACHER / "README.md").is_file()
    pipe = CogVideoXPipeline.from_pretrained(BASE)
    assert isinstance(pipe.vae, AutoencoderKLCogVideoX) and isinstance(pipe.transformer, CogVideoXTransformer3DModel)
    assert pipe.vae_scale_factor_spatial == 4 and pipe.vae_scale_factor_temporal == 4
    teacher = load_teacher("videomae", str(TEACHER), num_frames=8, frame_start=1, image_size=(32, 32))
    tokens = teacher(torch.rand(1, 9, 3, 32, 32))
    assert tokens.shape[:4] == (1, 4, 8, 8) and torch.isfinite(tokens).all()


def test_base_model_makes_moving_balls_of_the_prompted_colour(offline):
    pipe = demo.load_base()
    prompts = demo.held_out_prompts(2)  # 12 held-out captions, 2 per colour
    videos = demo.sample_videos(pipe, prompts, steps=20, seed=0)
    assert all(v.shape == (9, 32, 32, 3) for v in videos)
    ok = [demo.moving_ball(v, demo.prompt_colour(p)) for v, p in zip(videos, prompts)]
    assert np.mean(ok) >= RATE, list(zip(prompts, ok))


RATE = 0.75  # measured rate: see assets/models/video_demo_base/README.md


def test_demo_video_runs_end_to_end(offline, tmp_path):
    results = demo.run(tmp_path, steps=2, seeds=2, per_colour=1, clips=8, inference_steps=2, colours=("red", "blue"))
    assert (tmp_path / "report.html").is_file() and (tmp_path / "videos_seed0.png").is_file()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["summary"]) == set(demo.MODELS)
    for name in ("base", "plain", "trd"):
        for s in range(2):
            assert len(saved["videos"][name][str(s)]) == 2
            assert all((tmp_path / rel).is_file() for rel in saved["videos"][name][str(s)])
        assert saved["summary"][name]["colour_acc"]["n"] == 2
    assert (tmp_path / "finetune" / "trd" / "export" / "transformer" / "config.json").is_file()
    log = [json.loads(x) for x in (tmp_path / "finetune" / "trd" / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert all(r["align"] > 0 for r in log)
    plain = [json.loads(x) for x in (tmp_path / "finetune" / "plain" / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert all(r["align"] == 0 for r in plain)
    table = demo.format_table(results)
    assert all(label in table for label in demo.MODELS.values())
    page = (tmp_path / "report.html").read_text()
    assert page.count("<video") == len(demo.MODELS) * 2
    # the references: the simulated clips score as physical, and the bounce of every real clip is found
    assert saved["summary"]["real"]["colour_acc"]["mean"] == 1.0 and saved["summary"]["real"]["gravity_acc"]["mean"] == 1.0


def test_bundled_tokenizer_keeps_caption_words_whole(offline):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BASE / "tokenizer")
    caption = demo.held_out_prompts(1)[0]
    ids = tok(caption, padding="max_length", max_length=16)["input_ids"]
    words = caption.split()
    assert ids[:len(words) + 1] == [tok.convert_tokens_to_ids("\u2581" + w) for w in words] + [tok.eos_token_id]
    assert ids[len(words) + 1:] == [tok.pad_token_id] * (16 - len(words) - 1)


def test_demo_model_trainer_quick_trial_writes_loadable_models(offline, tmp_path):
    """tools/train_video_demo_models.py on a few CPU seconds per stage: every stage runs, the folders load
    as the bundled ones do, and training.json records the run."""
    import subprocess
    import sys

    import torch
    from diffusers import CogVideoXPipeline

    from gendistill.video_distill.teachers import load_teacher

    base, teacher = tmp_path / "base", tmp_path / "teacher"
    cmd = [sys.executable, str(ROOT / "tools/train_video_demo_models.py"), "--clips", "32", "--teacher-clips", "32",
           "--vae-minutes", "0.05", "--transformer-minutes", "0.05", "--teacher-minutes", "0.05",
           "--eval-per-colour", "1", "--batch", "4", "--out", str(base), "--teacher-out", str(teacher),
           "--work", str(tmp_path / "work")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((base / "training.json").read_text())
    assert record["vae"]["steps"] > 0 and record["transformer"]["steps"] > 0 and record["final"]
    assert 0.0 <= record["eval"]["moving_ball_rate"] <= 1.0 and record["eval"]["per_colour"] == 1
    assert json.loads((teacher / "training.json").read_text())["steps"] > 0
    # a second run resumes each stage from its checkpoint and finds it finished: nothing is trained again
    more = subprocess.run(cmd + ["--stage", "transformer"], capture_output=True, text=True, timeout=300)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "vae: resumed at step" in more.stdout and "transformer: resumed at step" in more.stdout
    again = json.loads((base / "training.json").read_text())
    assert again["vae"]["steps"] == record["vae"]["steps"]
    assert again["transformer"]["steps"] == record["transformer"]["steps"]
    pipe = CogVideoXPipeline.from_pretrained(base)
    assert pipe.vae.config.scaling_factor != 1.0  # set to 1 / std of the latents
    tokens = load_teacher("videomae", str(teacher), num_frames=8, frame_start=1, image_size=(32, 32))(
        torch.rand(1, 9, 3, 32, 32))
    assert tokens.shape[:4] == (1, 4, 8, 8)
