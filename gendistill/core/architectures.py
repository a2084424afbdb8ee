"""Real models at full size without their weights: architecture configs and random initialisation.

A model source written `random:<hub-id or folder>` builds that model from its architecture configs
(`config.json`, `model_index.json`, scheduler configs; no weights) with random weights, on the
device it is asked for. `configs/models/<hub-id>/` holds those configs for every model a shipped
config names; a local folder laid out like a hub repo works too. Tokenizers are stand-ins with the
real `model_max_length`, so prompts have the real sequence lengths. Use it to check that a config
fits and how fast it runs on a GPU before downloading anything:

    gendistill edit --config configs/splat_edit/romap_sd3.yaml \\
        guidance.model=random:stabilityai/stable-diffusion-3-medium-diffusers ...

The loaders (`load_pipeline`, the finetuner's, the teachers') call these functions when a source
starts with `random:`; the real path is `from_pretrained` everywhere else.
"""

from __future__ import annotations

import contextlib

import importlib
import json
import os
from pathlib import Path

import torch

__all__ = ["RANDOM_PREFIX", "MODELS_DIR", "is_random", "arch_folder", "random_model", "standin_tokenizer",
           "random_pipeline"]

RANDOM_PREFIX = "random:"
MODELS_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"


def is_random(source) -> bool:
    """True for a `random:` model source."""
    return isinstance(source, str) and source.startswith(RANDOM_PREFIX)


def arch_folder(source: str | os.PathLike) -> Path:
    """The folder holding the architecture configs of `source` (`random:` prefix optional).

    A local folder is used as is; a hub id maps to `configs/models/<hub-id>/`.
    """
    name = str(source)[len(RANDOM_PREFIX):] if is_random(source) else str(source)
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    folder = MODELS_DIR / name
    if folder.is_dir():
        return folder
    raise FileNotFoundError(
        f"no architecture config for {name!r}: add its config files (config.json, model_index.json, "
        f"scheduler configs; no weights) under {folder}/, or pass a local folder laid out like the hub repo")


def _json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (architecture config of this component)")
    return json.loads(path.read_text())


def _keep_fp32(model: torch.nn.Module) -> None:
    """Put back in float32 the modules a model keeps there when loaded in half precision (T5's `wo`)."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, module in model.named_modules():
        if keep and any(k in name.split(".") for k in keep):
            for pname, param in list(module.named_parameters(recurse=False)):
                setattr(module, pname, torch.nn.Parameter(param.detach().float(), requires_grad=param.requires_grad))


def _no_init_if_fake(cls):
    """Under fake tensors, transformers' weight initialisers are skipped: some (DINOv2's truncated normal)
    read values, which fake tensors do not have; a plan needs none."""
    from torch._guards import active_fake_mode

    if active_fake_mode() is not None and cls.__module__.startswith("transformers"):
        from transformers.initialization import no_init_weights

        return no_init_weights()
    return contextlib.nullcontext()


def random_model(cls, source, *, subfolder: str | None = None, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None):
    """`cls` (a diffusers model or scheduler, or a transformers model) built from the architecture
    config of `source` with random weights, created on `device` (default: CPU) in `dtype`."""
    folder = arch_folder(source) / (subfolder or "")
    if cls.__module__.startswith("transformers") and cls.__name__.startswith("Auto"):  # AutoModel & co
        from transformers import AutoConfig

        config = AutoConfig.for_model(**_json(folder / "config.json"))
        build = lambda: cls.from_config(config)  # noqa: E731
    elif getattr(cls, "config_class", None) is not None:  # a transformers model class
        config = cls.config_class.from_dict(_json(folder / "config.json"))
        build = lambda: cls(config)  # noqa: E731
    else:  # diffusers: ModelMixin / SchedulerMixin (ConfigMixin)
        name = "scheduler_config.json" if (folder / "scheduler_config.json").is_file() else "config.json"
        config = _json(folder / name)
        if not hasattr(cls, "parameters"):  # a scheduler: no weights, no device; real tensors even under fake ones
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            with unset_fake_temporarily():
                return cls.from_config(config)
        build = lambda: cls.from_config(config)  # noqa: E731
    previous = torch.get_default_dtype()
    try:  # created in `dtype`, as from_pretrained(torch_dtype=...) does (casting fails under fake tensors)
        torch.set_default_dtype(dtype or previous)
        with torch.device(device or "cpu"), _no_init_if_fake(cls):
            model = build()
        if hasattr(model, "tie_weights"):  # part of transformers' init_weights, which fake tensors skip
            model.tie_weights()
    finally:
        torch.set_default_dtype(previous)
    if dtype is not None and any(p.is_floating_point() and p.dtype != dtype for p in model.parameters()):
        torch.nn.Module.to(model, dtype)  # a config's own torch_dtype won over the default (transformers)
    if dtype is not None and dtype != torch.float32:
        _keep_fp32(model)
    return model.eval()


def standin_tokenizer(source, subfolder: str | None = None):
    """A byte-level CLIP tokenizer (one token per byte, no merges) with the real tokenizer's
    `model_max_length` (from `tokenizer_config.json`): real sequence lengths, made-up token ids,
    kept below the `vocab_size` of the matching text encoder (`tokenizer_2` -> `text_encoder_2`)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder = arch_folder(source)
    config = _json(folder / (subfolder or "") / "tokenizer_config.json")
    encoder = folder / (subfolder or "tokenizer").replace("tokenizer", "text_encoder") / "config.json"
    limit = int(_json(encoder).get("vocab_size", 1 << 30)) if encoder.is_file() else 1 << 30
    tokens = ["<|startoftext|>", "<|endoftext|>"] + [c + s for s in ("", "</w>") for c in bytes_to_unicode().values()]
    vocab = {t: i % limit for i, t in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=int(config["model_max_length"]))


def _component_class(library: str, class_name: str):
    module = importlib.import_module(library)
    if not hasattr(module, class_name):
        raise ValueError(f"{library} has no class {class_name} (named by a model_index.json)")
    return getattr(module, class_name)


def random_pipeline(source, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                    **overrides):
    """The diffusers pipeline of `source`'s `model_index.json`, every model with random weights.

    `overrides` replace components, as in `from_pretrained` (e.g. `text_encoder_3=None`).
    """
    import diffusers

    folder = arch_folder(source)
    index = _json(folder / "model_index.json")
    pipeline_cls = _component_class("diffusers", index["_class_name"])
    components = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, (list, tuple)):
            continue
        if name in overrides:
            components[name] = overrides[name]
            continue
        library, class_name = entry
        if library is None or name in ("safety_checker", "feature_extractor", "image_encoder"):
            components[name] = None
        elif "Tokenizer" in class_name:
            components[name] = standin_tokenizer(folder, name)
        else:
            cls = _component_class(library, class_name)
            is_scheduler = isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)
            components[name] = random_model(cls, folder, subfolder=name, dtype=None if is_scheduler else dtype,
                                            device=None if is_scheduler else device)
    if "requires_safety_checker" in _init_names(pipeline_cls):
        components["requires_safety_checker"] = False
    return pipeline_cls(**components)


def _init_names(cls) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters)
