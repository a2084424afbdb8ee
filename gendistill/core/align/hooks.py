"""Feature hooks: capture the hidden states of one block of a diffusers model, unmodified.

    with capture_block(transformer, align_layer=18) as feats:   # blocks[17]: align_layer is 1-based
        pred = transformer(hidden_states=latents, ...).sample
        tokens = feats.pop()                                     # [B, F, h, w, D], part of the graph
    loss = mse(pred, target) + trd_loss(proj(tokens), teacher_tokens)

Supported layouts (picked from the model class, or `kind=`):

- "cogvideox": `CogVideoXTransformer3DModel`; video tokens of `transformer_blocks[align_layer - 1]`
  as `[B, F, h, w, D]`, F the latent frames (divided by `patch_size_t` for CogVideoX 1.5) and
  h, w the patch grid, both read from the model input by a forward pre-hook.
- "sd3": `SD3Transformer2DModel`; image tokens of joint block `align_layer - 1` as `[B, h, w, D]`.
- "module": any named submodule (`align_layer="down_blocks.1"`, "mid_block", "up_blocks.2" of a
  `UNet2DConditionModel`); its output as is (the first element when it returns a tuple),
  e.g. `[B, C, H, W]`.

Gradient checkpointing (diffusers' `enable_gradient_checkpointing`, reentrant or not) recomputes
blocks during backward; hook calls made while autograd runs a backward, or outside a forward of the
hooked model, are ignored, so the captured tensor is the one of the forward pass, captured once.
The tensor is kept as the block returned it and reshaped only when read, which is what keeps the
autograd history that reentrant checkpointing attaches after the block has run.
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import nn

__all__ = ["FeatureHook", "capture_block", "unwrap_model", "block_layout", "num_blocks"]

KINDS = ("cogvideox", "sd3", "module")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / DeepSpeed (`.module`), torch.compile (`._orig_mod`) and PEFT wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        get_base = getattr(model, "get_base_model", None)
        if callable(get_base) and type(model).__name__.startswith("Peft"):
            model = get_base()
    return model


def block_layout(model: nn.Module) -> str:
    """How a model lays out its blocks for `FeatureHook`: "cogvideox", "sd3" or "module", from its class name."""
    name = type(model).__name__
    if name.startswith("CogVideoX") and hasattr(model, "transformer_blocks"):
        return "cogvideox"
    if name.startswith("SD3Transformer") and hasattr(model, "transformer_blocks"):
        return "sd3"
    return "module"


def num_blocks(model: nn.Module) -> int:
    """Number of transformer blocks (the largest valid 1-based `align_layer`)."""
    return len(unwrap_model(model).transformer_blocks)


def _in_backward() -> bool:
    """True while the autograd engine runs a backward (where checkpointing recomputes blocks)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def _first_tensor(value: Any, index: int = 0) -> torch.Tensor:
    if isinstance(value, (tuple, list)):
        value = value[index]
    elif hasattr(value, "to_tuple"):  # a diffusers / transformers output dataclass
        value = value.to_tuple()[index]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"the hooked block returned {type(value).__name__}, not a tensor")
    return value


class FeatureHook:
    """Captures the output of one block of a model at every forward; see `capture_block`.

    Holds at most one tensor, replaced at each forward of the model, dropped by `pop`, `clear` and
    `remove`. Usable as a context manager (hooks removed on exit).
    """

    def __init__(self, model: nn.Module, align_layer: int | str, *, kind: str = "auto"):
        self.model = unwrap_model(model)
        self.kind = block_layout(self.model) if kind == "auto" else kind
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; known: auto, {', '.join(KINDS)}")
        self.block_name, self.block = self._resolve(align_layer)
        self.align_layer = align_layer
        self.grid: tuple[int, ...] | None = None  # (F, h, w) or (h, w) of the current forward
        self._raw: torch.Tensor | None = None
        self._in_forward = False
        self._handles = [
            self.model.register_forward_pre_hook(self._on_model_start, with_kwargs=True),
            self.model.register_forward_hook(self._on_model_end, always_call=True),
            self.block.register_forward_hook(self._on_block),
        ]

    # -- setup -----------------------------------------------------------------------------------
    def _resolve(self, align_layer: int | str) -> tuple[str, nn.Module]:
        if isinstance(align_layer, str):
            try:
                return align_layer, self.model.get_submodule(align_layer)
            except AttributeError as err:
                raise ValueError(f"{type(self.model).__name__} has no submodule {align_layer!r}") from err
        if self.kind == "module":
            raise ValueError(f"kind 'module' needs a submodule name, got align_layer={align_layer!r}")
        blocks = self.model.transformer_blocks
        if isinstance(align_layer, bool) or not 1 <= int(align_layer) <= len(blocks):
            raise ValueError(
                f"align_layer is 1-based (align_layer=k hooks transformer_blocks[k-1]); "
                f"got {align_layer!r} for a model with {len(blocks)} blocks"
            )
        index = int(align_layer) - 1
        return f"transformer_blocks.{index}", blocks[index]

    # -- hooks -----------------------------------------------------------------------------------
    def _on_model_start(self, module, args, kwargs):
        if _in_backward():  # a whole-model recomputation: leave the captured tensor alone
            return
        self._raw = None
        self._in_forward = True
        if self.kind == "module":
            return
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        p = module.config.patch_size
        if self.kind == "cogvideox":
            _, frames, _, height, width = x.shape
            p_t = getattr(module.config, "patch_size_t", None)
            self.grid = (frames // p_t if p_t else frames, height // p, width // p)
        else:
            height, width = x.shape[-2:]
            self.grid = (height // p, width // p)

    def _on_model_end(self, module, args, output):
        self._in_forward = False

    def _on_block(self, module, args, output):
        if not self._in_forward or self._raw is not None or _in_backward():
            return  # a checkpoint recomputation, or a second call within one forward
        # SD3 joint blocks return (encoder_hidden_states, hidden_states); CogVideoX the reverse.
        self._raw = _first_tensor(output, 1 if self.kind == "sd3" else 0)

    # -- access ----------------------------------------------------------------------------------
    @property
    def features(self) -> torch.Tensor:
        """The captured block output of the last forward.

        "cogvideox": [B, F, h, w, D]; "sd3": [B, h, w, D]; "module": as the block returned it.
        """
        if self._raw is None:
            raise RuntimeError(
                f"no features captured from {self.block_name}: run a forward of the model first "
                "(or the hook was removed, or the features were already popped)"
            )
        x = self._raw
        if self.kind == "module":
            return x
        n_expected = 1
        for n in self.grid:
            n_expected *= n
        if x.ndim != 3 or x.shape[1] != n_expected:
            raise RuntimeError(
                f"{self.block_name} returned {tuple(x.shape)}, expected [B, {n_expected}, D] "
                f"tokens for the grid {self.grid}"
            )
        if self.kind == "cogvideox":
            f, h, w = self.grid
            return rearrange(x, "b (f h w) d -> b f h w d", f=f, h=h, w=w)
        h, w = self.grid
        return rearrange(x, "b (h w) d -> b h w d", h=h, w=w)

    def pop(self) -> torch.Tensor:
        """`features`, then forget them (so the graph is not kept alive by the hook)."""
        out = self.features
        self._raw = None
        return out

    def clear(self) -> None:
        self._raw = None

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        """Remove every hook this object registered and drop the captured tensor."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._raw = None
        self._in_forward = False

    def __enter__(self) -> "FeatureHook":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"FeatureHook({type(self.model).__name__}.{self.block_name}, kind={self.kind!r}, {state})"


def capture_block(model: nn.Module, align_layer: int | str, *, kind: str = "auto") -> FeatureHook:
    """Hook the output of one block of `model`; read it with `.features` / `.pop()` after a forward.

    Args:
        model: a diffusers model, possibly wrapped (DDP, accelerate, DeepSpeed, torch.compile, PEFT).
        align_layer: 1-based block index as in VideoREPA configs (`align_layer=18` hooks
            `transformer_blocks[17]`), or a submodule name ("down_blocks.1", "mid_block").
        kind: "auto" (from the model class), "cogvideox", "sd3" or "module".

    Returns:
        A `FeatureHook` (context manager; `.remove()` detaches it). Its `features` are
        [B, F, h, w, D] (cogvideox), [B, h, w, D] (sd3) or the block's own output (module).
    """
    return FeatureHook(model, align_layer, kind=kind)
