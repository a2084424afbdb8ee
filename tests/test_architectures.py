"""`random:` model sources: the real models' architecture configs (configs/models) and random-weight builds."""

import json
from pathlib import Path

import pytest
import torch

from gendistill.cli import main as cli_main
from gendistill.core.architectures import MODELS_DIR, arch_folder, random_model, random_pipeline, standin_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT / "assets" / "scenes" / "snowman.ply"

# Published parameter counts (model cards, papers, the diffusers / transformers conversion scripts).
PUBLISHED = [
    ("stabilityai/stable-diffusion-3-medium-diffusers", "transformer", "diffusers", "SD3Transformer2DModel", 2_028_328_000),
    ("THUDM/CogVideoX-2b", "transformer", "diffusers", "CogVideoXTransformer3DModel", 1_693_783_872),
    ("THUDM/CogVideoX-5b", "transformer", "diffusers", "CogVideoXTransformer3DModel", 5_570_283_072),
    ("THUDM/CogVideoX-5b", "text_encoder", "transformers", "T5EncoderModel", 4_762_310_656),
    ("stabilityai/stable-diffusion-2-1-base", "unet", "diffusers", "UNet2DConditionModel", 865_910_724),
    ("stabilityai/stable-diffusion-2-1-base", "text_encoder", "transformers", "CLIPTextModel", 340_387_840),
    ("timbrooks/instruct-pix2pix", "text_encoder", "transformers", "CLIPTextModel", 123_060_480),
    ("timbrooks/instruct-pix2pix", "vae", "diffusers", "AutoencoderKL", 83_653_863),
]


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model_id,subfolder,library,class_name,expected", PUBLISHED,
                         ids=[f"{m.split('/')[1]}-{s}" for m, s, *_ in PUBLISHED])
def test_architecture_configs_give_the_published_parameter_counts(model_id, subfolder, library, class_name, expected):
    import importlib

    cls = getattr(importlib.import_module(library), class_name)
    model = random_model(cls, f"random:{model_id}", subfolder=subfolder, device="meta")
    assert _count(model) == expected


def test_every_shipped_config_names_models_with_architecture_configs():
    import yaml

    names = set()
    for path in (ROOT / "configs").glob("*/*.yaml"):
        cfg = yaml.safe_load(path.read_text()) or {}
        for section, key in (("guidance", "model"), ("model", "pretrained")):
            value = (cfg.get(section) or {}).get(key)
            if value and not (cfg.get(section) or {}).get("tiny") and not str(value).startswith(("outputs", "assets")):
                names.add(value)
    assert names >= {"stabilityai/stable-diffusion-3-medium-diffusers", "THUDM/CogVideoX-5b"}
    for name in names:
        assert (arch_folder(name) / "model_index.json").is_file(), name


def _arch_only(pipe, folder: Path) -> Path:
    """Save a pipeline, then delete its weights and vocabularies: an architecture-only folder."""
    pipe.save_pretrained(folder)
    for f in list(folder.rglob("*")):
        if f.suffix in (".safetensors", ".bin", ".txt", ".model") or f.name in ("vocab.json", "tokenizer.json"):
            f.unlink()
    return folder


def test_random_pipeline_rebuilds_the_architecture(tmp_path):
    from gendistill.testing.diffusion import tiny_sd3_pipeline

    real = tiny_sd3_pipeline()
    folder = _arch_only(real, tmp_path / "sd3")
    pipe = random_pipeline(f"random:{folder}", dtype=torch.float16)
    assert type(pipe) is type(real)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(pipe, name), getattr(real, name)
        assert type(ours) is type(theirs)
        assert _count(ours) == _count(theirs)
        assert next(ours.parameters()).dtype == torch.float16
        assert not torch.equal(next(ours.parameters()).float(), next(theirs.parameters()).float())  # random
    assert pipe.tokenizer.model_max_length == real.tokenizer.model_max_length
    ids = pipe.tokenizer(["any prompt at all, with ümlauts"], padding="max_length", return_tensors="pt").input_ids
    assert ids.shape[1] == real.tokenizer.model_max_length
    assert int(ids.max()) < pipe.text_encoder.config.vocab_size
    assert type(pipe.scheduler) is type(real.scheduler)


def test_standin_tokenizer_keeps_ids_inside_the_text_encoders_vocabulary(tmp_path):
    folder = tmp_path / "m"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "text_encoder").mkdir()
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 11}))
    (folder / "text_encoder" / "config.json").write_text(json.dumps({"vocab_size": 40}))
    tok = standin_tokenizer(folder, "tokenizer")
    ids = tok(["Zebras ~ 123 |"], padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (1, 11) and int(ids.max()) < 40


def test_missing_architecture_config_names_the_folder_to_add(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=str(MODELS_DIR / "nobody" / "nothing")):
        arch_folder("random:nobody/nothing")
    code = cli_main(["edit", "--config", str(ROOT / "configs/splat_edit/tiny_cpu.yaml"), f"scene={SCENE}",
                     "part=hat", "edit_prompt=x", f"out={tmp_path / 'run'}", "guidance.model=random:nobody/nothing",
                     "guidance.tiny=null"])
    err = capsys.readouterr().err
    assert code == 2 and "guidance.model" in err and "nobody/nothing" in err
    assert not (tmp_path / "run").exists()


def test_edit_runs_on_random_weights(tmp_path):
    from gendistill.testing.diffusion import tiny_ip2p_pipeline

    folder = _arch_only(tiny_ip2p_pipeline(), tmp_path / "ip2p")
    out = tmp_path / "run"
    code = cli_main(["edit", "--config", str(ROOT / "configs/splat_edit/tiny_cpu.yaml"), "--no-progress", f"scene={SCENE}",
                     "part=hat", "prompt=a snowman", "edit_prompt=make the hat gold", f"out={out}", "steps=2",
                     f"guidance.model=random:{folder}", "guidance.tiny=null", "guidance.kind=auto",
                     "report.turntable_frames=4", "report.grid_views=2"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["guidance"]["kind"] == "ip2p"
    assert (out / "edited.ply").is_file()


def test_finetune_runs_on_random_weights(tmp_path):
    from gendistill.testing.video import tiny_pipeline, tiny_videomae

    cog = _arch_only(tiny_pipeline(), tmp_path / "cog")
    vmae = tmp_path / "vmae"
    tiny_videomae().save_pretrained(vmae)
    (vmae / "model.safetensors").unlink()
    out = tmp_path / "ft"
    code = cli_main(["finetune", "--config", str(ROOT / "configs/video_distill/tiny_cpu.yaml"), f"output_dir={out}",
                     f"model.pretrained=random:{cog}", "model.tiny=false", "teacher.name=videomaev2",
                     f"teacher.path=random:{vmae}", "max_steps=2", f"data.path={ROOT / 'assets' / 'clips'}"])
    assert code == 0
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert all(r["align"] > 0 for r in log)
