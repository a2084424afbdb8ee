from dataclasses import dataclass, field

import pytest

from gendistill.config import ConfigError, load_config, to_yaml


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class Cfg:
    name: str = "run"
    steps: int = 10
    optim: Optim = field(default_factory=Optim)


def test_defaults_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 20\noptim:\n  lr: 0.5\n")
    cfg = load_config(Cfg, f, ["optim.lr=0.25", "name=x"])
    assert isinstance(cfg, Cfg) and isinstance(cfg.optim, Optim)
    assert (cfg.steps, cfg.optim.lr, cfg.name, cfg.optim.betas) == (20, 0.25, "x", (0.9, 0.95))
    assert "lr: 0.25" in to_yaml(cfg)


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  learning_rate: 0.5\n")
    with pytest.raises(ConfigError, match=r"c.yaml.*optim.learning_rate"):
        load_config(Cfg, f)


def test_bad_overrides():
    with pytest.raises(ConfigError, match="unknown key 'stepz'"):
        load_config(Cfg, None, ["stepz=3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Cfg, None, ["steps"])
    with pytest.raises(ConfigError, match="steps"):
        load_config(Cfg, None, ["steps=many"])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Cfg, tmp_path / "nope.yaml")


def test_mixed_precision_no_survives_yaml(tmp_path):
    """`mixed_precision=no` (and a bare `no` in a file) is read by YAML 1.1 as false; it means "no"."""
    from gendistill.video_distill.finetune_config import FinetuneConfig, check_config

    cfg = load_config(FinetuneConfig, None, ["mixed_precision=no"])
    assert cfg.mixed_precision == "no"
    check_config(cfg)
    path = tmp_path / "c.yaml"
    path.write_text("mixed_precision: no\n")
    assert load_config(FinetuneConfig, path).mixed_precision == "no"


def test_a_value_for_a_section_says_what_the_section_expects():
    from gendistill.splat_edit.edit_config import EditConfig

    required = ["scene=s.ply", "part=p", "edit_prompt=e", "out=o", "guidance.model=m"]
    with pytest.raises(ConfigError, match=r"'cameras' is a section, not a value; set its keys, e\.g\. cameras\."):
        load_config(EditConfig, None, [*required, "cameras=3"])
    with pytest.raises(ConfigError, match=r"'guidance\.options' is a section"):
        load_config(EditConfig, None, [*required, "guidance.options=3"])


def test_adam_is_fused_where_the_kernel_exists(monkeypatch):
    """core.runtime.adam: the fused kernel when this torch has it, the plain Adam where it does not
    (CPU fused Adam needs torch 2.4; the package allows older)."""
    import torch

    from gendistill.core.runtime import adam

    p = torch.nn.Parameter(torch.zeros(3))
    assert adam([p], lr=0.1).defaults["fused"] is True
    real = torch.optim.Adam

    def old_torch(params, fused=None, **kwargs):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported "
                               "devices")
        return real(params, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", old_torch)
    opt = adam([p], lr=0.1, eps=1e-15)
    assert isinstance(opt, real) and not opt.defaults["fused"] and opt.defaults["eps"] == 1e-15
