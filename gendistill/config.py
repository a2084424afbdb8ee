"""One config system: nested dataclasses, YAML files, `key=value` overrides (OmegaConf).

    cfg = load_config(TrainConfig, "configs/video_distill/tiny_cpu.yaml", ["max_steps=10", "optim.lr=1e-4"])

Every error is a one-line `ConfigError` that names where the bad setting came from (the file or the
command line) and its dotted key: an unknown key, a value of the wrong type, a section given a value,
a broken `${...}` interpolation, a value a config's own check (`__post_init__`) rejects, a file that
is not YAML.
"""

from __future__ import annotations

import os
from dataclasses import is_dataclass
from pathlib import Path
from typing import Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the config's dataclass."""


def _one_line(text: str) -> str:
    """An error text on one line: OmegaConf's trailer (full_key, object_type) dropped, as the message names
    the key; line breaks inside a value escaped."""
    return str(text).split("\n    full_key:")[0].replace("\n", "\\n")


def _reason(err: Exception) -> str:
    return _one_line(getattr(err, "msg", None) or err)


def _merge(base, other, source: str):
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as err:
        raise ConfigError(f"{source}: unknown key {err.full_key!r}") from None
    except (OmegaConfBaseException, TypeError) as err:  # TypeError: a mapping given for a list (no key named)
        key = getattr(err, "full_key", None)
        key, node = (key, OmegaConf.select(base, key)) if key else (_misfit(base, other) or (None, None))
        if OmegaConf.is_dict(node):
            example = next(iter(node), "key")
            raise ConfigError(f"{source}: {key!r} is a section, not a value; set its keys, e.g. "
                              f"{key}.{example}=...") from None
        if OmegaConf.is_list(node) and isinstance(err, TypeError):
            raise ConfigError(f"{source}: {key!r} is a list, not a section; give it as [a, b, ...]") from None
        raise ConfigError(f"{source}: bad value for {key!r}: {_reason(err)}") from None


def _misfit(base, other, prefix: str = "") -> tuple[str, object] | None:
    """(dotted key, node of `base`) of the first key of `other` whose value is not the kind of container
    `base` holds there: a plain value or a list for a section, a mapping for a list (OmegaConf names none)."""
    for key in other:
        if key not in base.keys():  # an unknown key, or a new key of a free-form dict
            continue
        node, given = base._get_node(key), other._get_node(key)
        if OmegaConf.is_dict(node) and not OmegaConf.is_dict(given):
            return f"{prefix}{key}", node
        if OmegaConf.is_list(node) and OmegaConf.is_dict(given):
            return f"{prefix}{key}", node
        if OmegaConf.is_dict(node):
            inner = _misfit(node, given, f"{prefix}{key}.")
            if inner:
                return inner
    return None


def _builds(node) -> bool:
    try:
        OmegaConf.to_object(node)
        return True
    except Exception:  # noqa: BLE001 - only asked once a build has failed, to find where
        return False


def _rejected_key(node, prefix: str = "") -> str:
    """The dotted key whose value a config's own check (`__post_init__`) rejects: in the innermost section
    that does not build, the first key that lets it build when given its default back."""
    for key in node.keys():
        child = node._get_node(key)
        if OmegaConf.is_dict(child) and not _builds(child):
            return _rejected_key(child, f"{prefix}{key}.")
    default = OmegaConf.to_container(OmegaConf.structured(OmegaConf.get_type(node)))
    for key in node.keys():
        if _builds(OmegaConf.merge(node, {key: default[key]})):
            return f"{prefix}{key}"
    return prefix.rstrip(".") or "config"


def _yaml_problem(err: Exception) -> str:
    """What a YAML error says is wrong, and where, on one line."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if problem and mark:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return _one_line((str(err).splitlines() or [type(err).__name__])[0])


def read_yaml(path: str | os.PathLike) -> DictConfig:
    """The YAML file at `path` as a DictConfig; a ConfigError naming the file when it is missing, not
    YAML, or not `key: value` lines at the top level."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # yaml errors come in many types; OmegaConf refuses a file of one plain value
        raise ConfigError(f"{path}: not valid YAML (expected `key: value` lines): {_yaml_problem(err)}") from None
    if not OmegaConf.is_dict(loaded):
        raise ConfigError(f"{path}: expected `key: value` lines at the top level, got a list")
    return loaded


def _read_overrides(overrides: Sequence[str]) -> DictConfig:
    """`key=value` overrides as a DictConfig; a ConfigError naming the key of the first one that cannot be
    read, alone or on top of those before it (`a=[]` then `a.b=1`)."""
    given = OmegaConf.create()
    for n, item in enumerate(overrides, 1):
        try:
            given = OmegaConf.from_dotlist(list(overrides)[:n])
        except Exception as err:  # YAML's errors (a control character), OmegaConf's (a `${` left open), ...
            raise ConfigError(f"command line: bad value for {item.split('=', 1)[0]!r}: {_yaml_problem(err)}") from None
    return given


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Build `cls` (a dataclass) from its defaults, then the YAML file at `path`, then `key=value` overrides."""
    if not is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    cfg = OmegaConf.structured(cls)
    if path is not None:
        cfg = _merge(cfg, read_yaml(path), str(path))
    bad = [o for o in overrides if "=" not in o or not o.split("=", 1)[0].strip()]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {' '.join(bad)}")
    if overrides:
        cfg = _merge(cfg, _read_overrides(overrides), "command line")
    sources = ([str(path)] if path is not None else []) + (["command line"] if overrides else [])
    source = " + ".join(sources) or "config"
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if not missing:
            return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:  # a `${...}` interpolation that resolves to nothing
        raise ConfigError(f"{source}: bad value for {err.full_key!r}: {_reason(err)}") from None
    except ValueError as err:  # a config's own check
        raise ConfigError(f"{source}: {_rejected_key(cfg)}: {err}") from None
    raise ConfigError(f"{path or 'config'}: required key(s) not set: {', '.join(missing)}")


def to_yaml(cfg) -> str:
    """A dataclass config as YAML text (to save beside outputs)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
