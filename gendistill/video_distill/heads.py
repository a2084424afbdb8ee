"""Alignment heads (projector and grid aligner) loaded from our checkpoints or from released VideoREPA ones.

Released VideoREPA transformers (`CogVideoXTransformer3DModelAlign`, aHapBean/VideoREPA
`finetune/models/cogvideox_t2v_align/models/cogvideox_align.py`) carry the heads inside the
transformer's state dict: `projectors.0.{0,2,4}.*` (the MLP, our `Projector` layout) and
`downsampler_cogvideo_output.*` (the strided 3x3 conv, our `GridAligner.conv`). The transformer's own
keys load with `CogVideoXTransformer3DModel.from_pretrained`, which ignores these.

    heads = heads_state_dict("ckpt/cogvideox-2b-infer/transformer")   # {"projector.0.weight": ..., "aligner.conv.weight": ...}

Ours: an export or checkpoint folder with `projector/` and `aligner/` (diffusers models, see
`VideoREPATrainer.export`), or an older `align_heads.safetensors`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["OFFICIAL_KEYS", "heads_state_dict", "load_heads"]

# official prefix -> ours
OFFICIAL_KEYS = {"projectors.0.": "projector.", "downsampler_cogvideo_output.": "aligner.conv."}
OURS = ("projector.", "aligner.")


def _read(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _files(path: Path) -> list[tuple[str, Path]]:
    """(key prefix, weight file) pairs to read at `path`."""
    if path.is_file():
        return [("", path)]
    ours = [(f"{name}.", f) for name in ("projector", "aligner") for f in sorted((path / name).glob("*.safetensors"))]
    if ours:  # an export / checkpoint folder of ours
        return ours
    if (path / "align_heads.safetensors").is_file():  # written before the heads were diffusers models
        return [("", path / "align_heads.safetensors")]
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"align.heads: {path} holds no projector/, align_heads.safetensors or weight files")
    return [("", f) for f in files]


def heads_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Our `projector.*` / `aligner.*` tensors from `path`: our `align_heads.safetensors` (or a checkpoint
    folder holding it), or a released VideoREPA transformer (its folder, or one weight file)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"align.heads: {path} does not exist")
    heads = {}
    for prefix, file in _files(path):
        for key, value in _read(file).items():
            key = prefix + key
            if key.startswith(OURS):
                heads[key] = value
            for official, ours in OFFICIAL_KEYS.items():
                if key.startswith(official):
                    heads[ours + key[len(official):]] = value
    if not heads:
        raise ValueError(f"align.heads: {path} has no alignment heads (keys {', '.join(OFFICIAL_KEYS)}* of a "
                         f"VideoREPA transformer, or {', '.join(OURS)}* of ours)")
    return heads


def load_heads(student: torch.nn.Module, path: str | os.PathLike) -> None:
    """Copy the heads at `path` into `student.projector` / `student.aligner`; every head parameter of the
    student must be found with its shape, or a ValueError names the file and the keys."""
    heads = heads_state_dict(path)
    mine = {k: v for k, v in student.state_dict().items() if k.startswith(OURS)}
    missing = sorted(set(mine) - set(heads))
    wrong = sorted(k for k in set(mine) & set(heads) if heads[k].shape != mine[k].shape)
    if missing or wrong:
        shapes = "; ".join(f"{k}: {tuple(heads[k].shape)} in the file, {tuple(mine[k].shape)} here" for k in wrong)
        raise ValueError(f"align.heads: {path} does not fit this run's heads"
                         + (f"; missing {', '.join(missing)}" if missing else "") + (f"; {shapes}" if shapes else ""))
    with torch.no_grad():
        for key, value in mine.items():
            value.copy_(heads[key])
