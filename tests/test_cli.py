"""Conventions every `gendistill` command shares: --version, --print-config, --debug, --no-progress,
help with defaults and the config's keys, one-line errors."""

from pathlib import Path

import pytest
import yaml

from gendistill.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "splat_edit" / "demo_cpu.yaml"
SCENE = ROOT / "assets" / "scenes" / "snowman.ply"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("gendistill ")


def test_print_config_is_the_merged_config(capsys):
    assert main(["edit", "--config", str(DEMO), "--print-config", "steps=7", "guidance.reduction=masked_mean"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["steps"] == 7 and cfg["guidance"]["reduction"] == "masked_mean" and cfg["scene"].endswith("snowman.ply")
    assert main(["finetune", "--config", str(ROOT / "configs/video_distill/videorepa_5b_lora.yaml"),
                 "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["optim"]["betas"] == [0.9, 0.999]


def test_help_lists_defaults_and_config_keys(capsys):
    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    text = capsys.readouterr().out
    assert "config keys" in text and "lambda_anchor" in text and "default 10.0" in text and "--no-progress" in text
    with pytest.raises(SystemExit):
        main(["render", "--help"])
    assert "(default: 120)" in capsys.readouterr().out  # --frames


def test_errors_are_one_line_unless_debug(tmp_path, capsys):
    args = ["render", str(SCENE), "--out", str(tmp_path), "--frames", "1", "--size", "8x8", "--backend", "nope"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gendistill render: error: unknown render backend 'nope'") and "\n" not in err
    assert not err.split("error: ", 1)[1].startswith(("'", '"'))  # a KeyError's message, not its repr
    with pytest.raises(KeyError):
        main([*args, "--debug"])
