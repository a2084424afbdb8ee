"""The model card `README.md` of a finetune export and `gendistill finetune --push-to-hub`: the card's
metadata and body, the startup checks (no token, offline, unreachable Hub), and the push itself, with
`huggingface_hub.HfApi` replaced by a fake that records its calls (no network)."""

import contextlib
import hashlib
import io
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import yaml
from safetensors.torch import load_file

from gendistill.cli import main
from gendistill.config import load_config
from gendistill.testing.video import write_tiny_models
from gendistill.video_distill.export import HubError, model_card, push_export
from gendistill.video_distill.finetune_config import FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "video_distill" / "tiny_cpu.yaml"
CLIPS = ROOT / "assets" / "clips"
REPO = "me/tiny-videorepa"

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: thread wake-ups would dominate


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """The tiny models, the CogVideoX one with a card of its own that states a licence."""
    paths = write_tiny_models(tmp_path_factory.mktemp("tiny-models"))
    (paths["cogvideox"] / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# tiny CogVideoX\n")
    return paths


def overrides(models, out):
    """key=value overrides of a 1-step LoRA run of the tiny models into `out`."""
    return [f"output_dir={out}", f"model.pretrained={models['cogvideox']}", f"teacher.path={models['videomae']}",
            f"data.path={CLIPS}", "training_type=lora", "max_steps=1", "checkpoint.every=0", "validation.every=0",
            "gradient_checkpointing=false"]


def fake_hub(mp, calls, *, token="hf_test", fail=None):
    """Replace the Hub: `get_token` returns `token`; `HfApi` records its calls in `calls` and raises
    `fail[method]` for the methods named there."""
    mp.delenv("HF_HUB_OFFLINE", raising=False)
    mp.delenv("TRANSFORMERS_OFFLINE", raising=False)
    mp.setattr(huggingface_hub, "get_token", lambda: token)
    mp.setattr(huggingface_hub, "HfApi", lambda token=None: FakeApi(calls, token, fail or {}))


def digest(folder: Path) -> dict:
    """Every file under `folder` with its SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def front_matter(path: Path) -> dict:
    text = path.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture(scope="module")
def pushed(tiny_models, tmp_path_factory):
    """One `gendistill finetune --push-to-hub` run (LoRA, 1 step) against the fake Hub: its output
    folder, the Hub calls, the exit code and what it printed."""
    out = tmp_path_factory.mktemp("pushed") / "run"
    argv = ["finetune", "--no-progress", "--push-to-hub", "--hub-repo-id", REPO, "--config", str(TINY),
            *overrides(tiny_models, out)]
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        fake_hub(mp, calls)
        mp.setattr(sys, "argv", ["/venv/bin/gendistill", *argv])
        mp.setattr(FakeApi, "export", out / "export")
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            rc = main(argv)
    return {"out": out, "calls": calls, "rc": rc, "printed": printed.getvalue()}


# -- the card ---------------------------------------------------------------------------------------
def test_card_metadata_parses_back(pushed):
    card = huggingface_hub.ModelCard.load(pushed["out"] / "export" / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-video"
    assert {"text-to-video", "videorepa", "cogvideox", "lora"} <= set(data["tags"])
    assert data["license"] == "apache-2.0"  # from the base model's own card
    assert "base_model" not in data  # a local folder is no Hub id
    assert front_matter(pushed["out"] / "export" / "README.md") == data


def test_card_body_names_method_teacher_steps_data_and_command(pushed, tiny_models):
    text = (pushed["out"] / "export" / "README.md").read_text()
    assert "VideoREPA" in text and "0.5 x TRD" in text and "margin 0.1" in text and "reduction `joint`" in text
    assert f"`videomae` (`{tiny_models['videomae']}`)" in text and "frames 1..8 at 32x32" in text
    assert "| Aligned block | 2 (1-based)" in text
    assert "| Steps trained | 1 optimizer steps (max_steps 1) |" in text
    n_clips = len(list(CLIPS.glob("*.mp4")))
    assert f"| Data | {n_clips} clips from `{CLIPS}`" in text
    assert "LoRA rank 4, alpha 8" in text
    command = [line for line in text.splitlines() if line.startswith("gendistill finetune")]
    assert command == [f"gendistill finetune --no-progress --push-to-hub --hub-repo-id {REPO} --config {TINY} "
                       + " ".join(overrides(tiny_models, pushed["out"]))]


def test_card_of_hub_cached_and_random_base_models(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)  # no cached card
    cfg = load_config(FinetuneConfig, TINY, ["model.pretrained=THUDM/CogVideoX-5b", "training_type=sft",
                                             "align.loss=repa", "teacher.path=null"])
    card = model_card(cfg, step=7, num_clips=3, num_processes=2, command="gendistill finetune --config x.yaml")
    card.save(tmp_path / "README.md")
    data = front_matter(tmp_path / "README.md")
    assert data["base_model"] == "THUDM/CogVideoX-5b" and "license" not in data and "lora" not in data["tags"]
    assert "repa" in data["tags"] and "videorepa" not in data["tags"]
    assert "| Batch | 1 per process x 1 accumulation x 2 process(es) = 2 clips |" in card.text
    assert "its default checkpoint" in card.text and 'subfolder="transformer"' in card.text
    # a folder of the Hub cache: its id and the licence of its card
    snapshot = tmp_path / "hub" / "models--Org--CogVideoX-tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: other\nlicense_name: cogvideox-license\n---\n")
    cfg.model.pretrained = str(snapshot)
    data = model_card(cfg, step=7, command="c").data.to_dict()
    assert (data["base_model"], data["license"], data["license_name"]) == ("Org/CogVideoX-tiny", "other",
                                                                          "cogvideox-license")
    cfg.model.pretrained, cfg.align.loss = "random:THUDM/CogVideoX-5b", "none"
    card = model_card(cfg, step=7, command="c")
    assert "base_model" not in card.data.to_dict() and "with random weights" in card.text
    assert "Teacher" not in card.text and "diffusion loss only" in card.text


# -- the push ---------------------------------------------------------------------------------------
def test_push_uploads_the_export_folder(pushed):
    out, calls = pushed["out"], pushed["calls"]
    assert pushed["rc"] == 0
    # at startup, before anything was trained: the account, then the repo
    assert [c[0] for c in calls[:2]] == ["whoami", "create_repo"]
    assert calls[1][1]["repo_id"] == REPO and calls[1][1]["export_exists"] is False
    upload = [c[1] for c in calls if c[0] == "upload_folder"]
    assert len(upload) == 1 and upload[0]["repo_id"] == REPO and upload[0]["token"] == "hf_test"
    assert Path(upload[0]["folder_path"]) == out / "export" and upload[0]["repo_type"] == "model"
    assert f"pushed {out / 'export'}/ to https://huggingface.co/{REPO}" in pushed["printed"]


def test_push_without_token_fails_before_training(tiny_models, tmp_path, monkeypatch, capsys):
    calls = []
    fake_hub(monkeypatch, calls, token=None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    rc = main(["finetune", "--push-to-hub", "--config", str(TINY), *overrides(tiny_models, tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "HF_TOKEN" in err and "login" in err and "token" in err
    assert not (tmp_path / "run").exists() and calls == []


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "unreachable"])
def test_push_offline_at_startup_fails_before_training(tiny_models, tmp_path, monkeypatch, capsys, how):
    calls = []
    fake_hub(monkeypatch, calls, fail={"whoami": ConnectionError("Name or service not known")})
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = main(["finetune", "--push-to-hub", "--config", str(TINY), *overrides(tiny_models, tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert ("offline" if how == "HF_HUB_OFFLINE" else "unreachable") in err
    assert str(tmp_path / "run" / "export") in err and not (tmp_path / "run").exists()


def test_push_offline_or_unreachable_keeps_the_export(pushed, monkeypatch):
    folder = pushed["out"] / "export"
    before = digest(folder)
    assert {"README.md", "config.yaml", "pytorch_lora_weights.safetensors", "projector/config.json",
            "aligner/config.json"} <= set(before)
    calls = []
    fake_hub(monkeypatch, calls, fail={"upload_folder": ConnectionError("connection reset")})
    with pytest.raises(HubError, match="unreachable") as err:
        push_export(folder, REPO, token="hf_test")
    assert f"kept at {folder}/" in str(err.value) and "\n" not in str(err.value)
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="offline") as err:
        push_export(folder, REPO, token="hf_test")
    assert f"kept at {folder}/" in str(err.value) and len(calls) == 2  # no call while offline
    assert digest(folder) == before
    assert load_file(folder / "pytorch_lora_weights.safetensors")


def test_hub_repo_id_needs_push_to_hub(tiny_models, tmp_path, capsys):
    rc = main(["finetune", "--hub-repo-id", REPO, "--config", str(TINY), *overrides(tiny_models, tmp_path / "run")])
    assert rc == 2 and "--push-to-hub" in capsys.readouterr().err and not (tmp_path / "run").exists()


class FakeApi:
    """Records (method, kwargs) in `calls`; raises `fail[method]` when given."""

    export = None  # an export folder: create_repo records whether it exists yet

    def __init__(self, calls, token, fail):
        self.calls, self.token, self.fail = calls, token, fail

    def _call(self, name, **kwargs):
        self.calls.append((name, {**kwargs, "token": self.token}))
        if name in self.fail:
            raise self.fail[name]

    def whoami(self):
        self._call("whoami")
        return {"name": "me", "auth": {"accessToken": {"role": "write"}}}

    def create_repo(self, repo_id, **kwargs):
        self._call("create_repo", repo_id=repo_id, export_exists=self.export is not None and self.export.exists(),
                   **kwargs)

    def upload_folder(self, **kwargs):
        self._call("upload_folder", **kwargs)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/0")
