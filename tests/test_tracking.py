"""Tracking through accelerate's trackers (`report_to`) and the held-out validation loss, on the tiny config."""

import json
from pathlib import Path

import pytest
import torch

from gendistill.config import load_config
from gendistill.testing.video import write_tiny_models
from gendistill.video_distill import finetune_config as FC
from gendistill.video_distill.finetune_config import FinetuneConfig, tracker_names
from gendistill.video_distill.trainer import VideoREPATrainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "video_distill" / "tiny_cpu.yaml"
CLIPS = ROOT / "assets" / "clips"
QUIET = ("checkpoint.every=0", "export=false")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("tiny-models"))


def tiny_cfg(tiny_models, out, *overrides):
    base = [f"output_dir={out}", f"model.pretrained={tiny_models['cogvideox']}",
            f"teacher.path={tiny_models['videomae']}", f"data.path={CLIPS}"]
    return load_config(FinetuneConfig, TINY, base + list(overrides))


def _no_models(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(VideoREPATrainer, "_load_models", refuse)


def test_tensorboard_scalars_and_videos_match_the_jsonl_log(tiny_models, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_models, out, "report_to=tensorboard", "max_steps=4", "validation.every=2",
                   f"validation.data={CLIPS}", "validation.loss_clips=2", *QUIET)
    summary = VideoREPATrainer(cfg).train()
    runs = list((out / "logs" / "videorepa").glob("events.out.tfevents.*"))
    assert len(runs) == 1
    events = EventAccumulator(str(runs[0].parent))
    events.Reload()
    tags = events.Tags()
    expected = {"train/loss", "train/loss_diffusion", "train/loss_align", "train/lr", "train/grad_norm",
                "train/clips_per_s", "train/tokens_per_s", "train/rss_gb", "val/loss_diffusion", "val/loss_align"}
    assert expected <= set(tags["scalars"]), tags["scalars"]
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in expected}
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # the JSONL log as before: one record a step, no new keys
    assert all(set(r) == {"loss", "diffusion", "align", "step", "lr", "skipped", "skipped_nonfinite"} for r in log)
    for tag, key in (("train/loss", "loss"), ("train/loss_diffusion", "diffusion"), ("train/loss_align", "align"),
                     ("train/lr", "lr")):
        assert sorted(scalars[tag]) == [1, 2, 3, 4], tag
        for r in log:
            assert scalars[tag][r["step"]] == pytest.approx(r[key], rel=1e-6), (tag, r["step"])
    assert sorted(scalars["train/grad_norm"]) == [1, 2, 3, 4]
    assert all(v > 0 for v in scalars["train/grad_norm"].values())
    assert all(v > 0 for v in scalars["train/clips_per_s"].values())
    # tokens/s = clips/s x the video tokens of one clip, counted here from the configs: latent frames
    # (temporal compression) x latent height and width (spatial compression) / the transformer's patch
    vae, tr = (json.loads((Path(tiny_models["cogvideox"]) / sub / "config.json").read_text())
               for sub in ("vae", "transformer"))
    down = 2 ** (len(vae["block_out_channels"]) - 1)
    per_clip = (((cfg.data.num_frames - 1) // vae["temporal_compression_ratio"] + 1) // (tr["patch_size_t"] or 1)
                * (cfg.data.height // down // tr["patch_size"]) * (cfg.data.width // down // tr["patch_size"]))
    for step, clips_per_s in scalars["train/clips_per_s"].items():
        assert scalars["train/tokens_per_s"][step] == pytest.approx(clips_per_s * per_clip, rel=1e-5)
    for tag in ("val/loss_diffusion", "val/loss_align"):
        assert sorted(scalars[tag]) == [2, 4], tag
        for r in summary["history"]:
            if r["step"] in (2, 4):
                assert scalars[tag][r["step"]] == pytest.approx(r[tag], rel=1e-6)
    # the validation video of each validation step, as an animated GIF
    assert tags["images"] == ["validation/prompt-00"]
    videos = events.Images("validation/prompt-00")
    assert [v.step for v in videos] == [2, 4]
    assert videos[0].encoded_image_string[:6] == b"GIF89a" and (videos[0].width, videos[0].height) == (32, 32)


def test_validation_loss_is_deterministic_and_moves_with_training(tiny_models, tmp_path):
    common = (f"validation.data={CLIPS}", "validation.loss_clips=2", "optim.warmup_steps=0", "report_to=none")
    trainer = VideoREPATrainer(tiny_cfg(tiny_models, tmp_path / "a", *common))
    rng = trainer.generator.get_state()
    first = trainer.validation_loss()
    assert set(first) == {"val/loss_diffusion", "val/loss_align"}
    assert trainer.validation_loss() == first  # same weights: the same values, exactly
    assert torch.equal(trainer.generator.get_state(), rng)  # and the training noise stream untouched
    assert trainer.student.training
    other = VideoREPATrainer(tiny_cfg(tiny_models, tmp_path / "b", *common))  # same seed: same weights
    assert other.validation_loss() == first
    loader = iter(trainer._make_loader(0))
    for _ in range(2):
        trainer.training_step(next(loader))
    after = trainer.validation_loss()
    assert after["val/loss_diffusion"] != first["val/loss_diffusion"]
    assert after["val/loss_align"] != first["val/loss_align"]
    assert trainer.validation_loss() == after
    plain = VideoREPATrainer(tiny_cfg(tiny_models, tmp_path / "c", *common, "align.loss=none"))
    assert set(plain.validation_loss()) == {"val/loss_diffusion"}


# Runs the real CLI; each rank notes its trackers and its last history record.
_RANK_TRACKERS = """
import json, sys
from gendistill import cli
from gendistill.video_distill import trainer as T

train = T.VideoREPATrainer.train
def train_and_note(self):
    out = train(self)
    note = {"trackers": [t.name for t in self.accelerator.trackers], "last": out["history"][-1]}
    (self.out / f"rank{self.rank}.json").write_text(json.dumps(note))
    return out
T.VideoREPATrainer.train = train_and_note
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_only_the_main_process_logs(tiny_models, tmp_path, free_port):
    """Two CPU processes (torchrun, gloo): both compute the validation loss (one clip each, gathered: the
    same value), only rank 0 starts a tracker and writes events."""
    import os
    import subprocess
    import sys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    script = tmp_path / "run_rank.py"
    script.write_text(_RANK_TRACKERS)
    out = tmp_path / "ddp"
    args = ["finetune", "--no-progress", "--config", str(TINY), f"output_dir={out}", f"model.pretrained={tiny_models['cogvideox']}",
            f"teacher.path={tiny_models['videomae']}", f"data.path={CLIPS}", "max_steps=2", "validation.every=2",
            "validation.prompts=[]", f"validation.data={CLIPS}", "validation.loss_clips=2", "report_to=tensorboard",
            *QUIET]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for attempt in range(2):  # a gloo rendezvous occasionally aborts on CPU: retry once on a fresh port
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(free_port()), str(script), *args],
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
        if proc.returncode == 0:
            break
    assert proc.returncode == 0, proc.stderr[-3000:]
    notes = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert notes[0]["trackers"] == ["tensorboard"] and notes[1]["trackers"] == []
    assert notes[0]["last"]["val/loss_diffusion"] == notes[1]["last"]["val/loss_diffusion"]
    files = list(out.rglob("events.out.tfevents.*"))
    main = [f for f in files if f.parent == out / "logs" / "videorepa"]
    assert len(main) == 1 and len(files) == 2, files  # the run's events, and its hyperparameters in a subfolder
    events = EventAccumulator(str(main[0].parent))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert [e.step for e in events.Scalars("val/loss_diffusion")] == [2]
    assert events.Scalars("val/loss_diffusion")[0].value == pytest.approx(notes[0]["last"]["val/loss_diffusion"])
    assert len((out / "logs" / "train_log.jsonl").read_text().splitlines()) == 2


def _wandb_offline(monkeypatch, tmp_path):
    """wandb offline and quiet, its caches and settings in tmp_path: nothing leaves the machine or the test."""
    pytest.importorskip("wandb")
    for var, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_CACHE_DIR", tmp_path / "cache"),
                       ("WANDB_CONFIG_DIR", tmp_path / "config"), ("WANDB_DATA_DIR", tmp_path / "data")):
        monkeypatch.setenv(var, str(value))


def _wandb_records(path: Path) -> dict[str, list]:
    """The records of a `.wandb` run file by kind ({"history": [...], "summary": [...], ...}). The framing is
    read here (wandb's Python reader is gone; wandb-core writes the file): a LevelDB-style log, a 7-byte header
    ":W&B", magic 0xBEE1, version 0, then 32 KiB blocks of chunks [crc32 u32, length u16, type u8 (1 full,
    2 first, 3 middle, 4 last)]; each record is wandb's `wandb_internal_pb2.Record` protobuf."""
    import struct
    import zlib

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0), f"unknown .wandb format: {data[:7]!r}"
    records, pos, parts = {}, 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the zero padding at the end of a block
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + n]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad checksum at byte {pos}"
        parts, pos = parts + chunk, pos + 7 + n
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(parts)
            parts = b""
            kind_name = record.WhichOneof("record_type")
            records.setdefault(kind_name, []).append(getattr(record, kind_name))
    assert not parts, "the file ends inside a record"
    return records


def _wandb_items(items) -> dict:
    """History / summary items as {"a/b": value} (nested keys joined with "/")."""
    return {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in items}


def _end_tracking(trainer) -> None:
    """End the run's trackers as `finetune` does, then wait for wandb's service to write the run file out:
    `finish()` can return before wandb-core has flushed it (at process exit the service's teardown does)."""
    import wandb

    trainer.accelerator.end_training()
    wandb.teardown()


def _wandb_run(out: Path) -> tuple[Path, dict[str, list]]:
    runs = list((out / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1, files
    return runs[0], _wandb_records(files[0])


def test_wandb_offline_run_matches_the_jsonl_log(tiny_models, tmp_path, monkeypatch):
    """report_to=wandb under WANDB_MODE=offline: one offline run in logs/wandb/ whose history (read back
    from the .wandb file) holds each step's losses as the JSONL log has them, the validation losses, the
    validation video (the very file in validation/), the config; its summary holds the last values."""
    import hashlib

    _wandb_offline(monkeypatch, tmp_path)
    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_models, out, "report_to=wandb", "max_steps=2", "validation.every=2",
                   f"validation.data={CLIPS}", "validation.loss_clips=1", *QUIET)
    trainer = VideoREPATrainer(cfg)
    summary = trainer.train()
    assert [t.name for t in trainer.accelerator.trackers] == ["wandb"]
    _end_tracking(trainer)
    assert not (out / "logs" / cfg.tracker_project).exists()  # no tensorboard events
    run_dir, records = _wandb_run(out)

    (run,) = records["run"]
    assert (run.project, run.display_name) == ("videorepa", "run")
    config = {}
    for update in records["config"]:
        config.update(_wandb_items(update.update))
    assert config["report_to"] == "wandb" and config["max_steps"] == 2 and config["lora.rank"] == 4
    assert config["validation.prompts"] == json.dumps(cfg.validation.prompts)
    assert [e.exit_code for e in records["exit"]] == [0]

    rows = {row["_step"]: row for row in (_wandb_items(h.item) for h in records["history"])}
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == sorted(rows) == [1, 2]
    for r in log:
        for tag, key in (("train/loss", "loss"), ("train/loss_diffusion", "diffusion"),
                         ("train/loss_align", "align"), ("train/lr", "lr")):
            assert rows[r["step"]][tag] == pytest.approx(r[key], rel=1e-12), (tag, r["step"])
        assert rows[r["step"]]["train/grad_norm"] > 0 and rows[r["step"]]["train/clips_per_s"] > 0
    last = summary["history"][-1]
    assert "val/loss_diffusion" not in rows[1]
    for tag in ("val/loss_diffusion", "val/loss_align"):
        assert rows[2][tag] == pytest.approx(last[tag], rel=1e-12)

    # the validation video: logged at step 2 with its prompt, the mp4 in validation/ copied unchanged
    mp4 = out / "validation" / "step-000002_prompt-00.mp4"
    digest = hashlib.sha256(mp4.read_bytes()).hexdigest()
    video = {k.split("/", 2)[2]: v for k, v in rows[2].items() if k.startswith("validation/prompt-00/")}
    assert video["_type"] == "video-file" and video["caption"] == cfg.validation.prompts[0]
    assert video["sha256"] == digest and video["size"] == mp4.stat().st_size
    assert (run_dir / "files" / video["path"]).read_bytes() == mp4.read_bytes()

    final = {}
    for update in records["summary"]:
        final.update(_wandb_items(update.update))
    for tag in ("train/loss", "train/loss_diffusion", "train/loss_align", "train/lr", "val/loss_diffusion",
                "val/loss_align", "validation/prompt-00/sha256"):
        assert final[tag] == rows[2][tag], tag


def test_report_to_all_starts_both_trackers(tiny_models, tmp_path, monkeypatch):
    """With tensorboard and wandb installed, report_to=all starts both, and both get the same step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _wandb_offline(monkeypatch, tmp_path)
    assert tracker_names("all") == ["tensorboard", "wandb"]
    out = tmp_path / "run"
    trainer = VideoREPATrainer(tiny_cfg(tiny_models, out, "report_to=all", "max_steps=1", "validation.every=0",
                                        *QUIET))
    trainer.train()
    assert [t.name for t in trainer.accelerator.trackers] == ["tensorboard", "wandb"]
    _end_tracking(trainer)
    (record,) = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "logs" / "videorepa"))
    events.Reload()
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("train/loss")] == [(1, record["loss"])]
    _, records = _wandb_run(out)
    (row,) = [_wandb_items(h.item) for h in records["history"]]
    assert row["_step"] == 1 and row["train/loss"] == pytest.approx(record["loss"], rel=1e-12)


def test_report_to_default_and_choices(tiny_models, tmp_path, monkeypatch):
    installed = FC._installed("tensorboard")
    assert load_config(FinetuneConfig, TINY).report_to == ("tensorboard" if installed else "none")
    assert tracker_names("none") == [] and tracker_names("wandb") == ["wandb"]
    assert set(tracker_names("all")) <= {"tensorboard", "wandb"}
    monkeypatch.setattr(FC, "_installed", lambda name: False)  # nothing installed: the default is none...
    cfg = tiny_cfg(tiny_models, tmp_path / "run", "max_steps=1", "validation.every=0", *QUIET)
    assert cfg.report_to == "none" and tracker_names("all") == []
    assert VideoREPATrainer(cfg).train()["step"] == 1  # ...and the run goes on without a tracker


def test_bad_tracking_settings_fail_before_models_load(tiny_models, tmp_path, monkeypatch):
    _no_models(monkeypatch)
    with pytest.raises(ValueError, match=r"report_to must be one of \('none', 'tensorboard', 'wandb', 'all'\), "
                                         r"got 'tensorbord'"):
        VideoREPATrainer(tiny_cfg(tiny_models, tmp_path, "report_to=tensorbord"))
    with pytest.raises(FileNotFoundError, match="validation.data: .*nowhere"):
        VideoREPATrainer(tiny_cfg(tiny_models, tmp_path, f"validation.data={tmp_path / 'nowhere'}"))
    with pytest.raises(ValueError, match="validation.loss_clips must be >= 1"):
        VideoREPATrainer(tiny_cfg(tiny_models, tmp_path, "validation.loss_clips=0"))
    installed = FC._installed
    monkeypatch.setattr(FC, "_installed", lambda name: name != "tensorboard" and installed(name))
    with pytest.raises(ValueError, match="report_to=tensorboard but tensorboard is not installed: "
                                         "pip install tensorboard"):
        VideoREPATrainer(tiny_cfg(tiny_models, tmp_path, "report_to=tensorboard"))
    monkeypatch.setattr(FC, "_installed", lambda name: name != "wandb" and installed(name))
    with pytest.raises(ValueError, match="report_to=wandb but wandb is not installed: pip install wandb"):
        VideoREPATrainer(tiny_cfg(tiny_models, tmp_path, "report_to=wandb"))
