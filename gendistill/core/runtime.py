"""Where and how things run: device and dtype names, resolved once for every command, and Adam with the
fastest kernel the installed torch has."""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "as_dtype", "resolve_device", "adam"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def as_dtype(dtype) -> torch.dtype | None:
    """A torch.dtype from a dtype or one of `DTYPES`' names; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected a torch.dtype or one of {', '.join(DTYPES)}")
    return DTYPES[str(dtype)]


def resolve_device(name: str | torch.device | None) -> torch.device:
    """`name` as a torch.device; None: CUDA when available, else the CPU. Asking for CUDA without it fails."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r} asked for, but CUDA is not available")
    return dev


def adam(params, **kwargs) -> torch.optim.Adam:
    """`torch.optim.Adam(params, fused=True, **kwargs)` where this torch and device have the fused kernel
    (several times faster on CPU; CPU support came in torch 2.4), else the plain one."""
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this torch / device / dtype
        return torch.optim.Adam(params, **kwargs)
