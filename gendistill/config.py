"""One config system: nested dataclasses, YAML files, `key=value` overrides (OmegaConf).

    cfg = load_config(TrainConfig, "configs/video_distill/tiny_cpu.yaml", ["max_steps=10", "optim.lr=1e-4"])

An unknown key, in the file or an override, is an error naming the key and where it came from.
"""

from __future__ import annotations

import os
from dataclasses import is_dataclass
from pathlib import Path
from typing import Sequence, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the config's dataclass."""


def _merge(base, other, source: str):
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as err:
        raise ConfigError(f"{source}: unknown key {err.full_key!r}") from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or _section_given_a_value(base, other)
        section = OmegaConf.select(base, key) if key else None
        if OmegaConf.is_dict(section):
            example = next(iter(section), "key")
            raise ConfigError(f"{source}: {key!r} is a section, not a value; set its keys, e.g. "
                              f"{key}.{example}=...") from None
        raise ConfigError(f"{source}: bad value for {key!r}: {err.msg if hasattr(err, 'msg') else err}") from None


def _section_given_a_value(base, other) -> str | None:
    """The first key of `other` that gives a plain value where `base` has a section (OmegaConf names none)."""
    for key in other:
        if OmegaConf.is_dict(base.get(key)) and not OmegaConf.is_dict(other[key]):
            return str(key)
        if OmegaConf.is_dict(base.get(key)) and OmegaConf.is_dict(other[key]):
            inner = _section_given_a_value(base[key], other[key])
            if inner:
                return f"{key}.{inner}"
    return None


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Build `cls` (a dataclass) from its defaults, then the YAML file at `path`, then `key=value` overrides."""
    if not is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    cfg = OmegaConf.structured(cls)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = OmegaConf.load(path)
        except Exception as err:  # yaml errors come in many types
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        cfg = _merge(cfg, loaded, str(path))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {' '.join(bad)}")
    if overrides:
        cfg = _merge(cfg, OmegaConf.from_dotlist(list(overrides)), "command line")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{path or 'config'}: required key(s) not set: {', '.join(missing)}")
    return OmegaConf.to_object(cfg)


def to_yaml(cfg) -> str:
    """A dataclass config as YAML text (to save beside outputs)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
