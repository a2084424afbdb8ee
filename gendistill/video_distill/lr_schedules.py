"""Learning-rate schedules: diffusers' (`diffusers.optimization.get_scheduler`) and DeepSpeed's
WarmupDecayLR, which the official VideoREPA runs used (`finetune/configs/zero2.yaml`).

    scheduler = build_scheduler("warmup_decay_log", optimizer, warmup_steps=100, total_steps=2000)
"""

from __future__ import annotations

import math

import torch

SCHEDULERS_OF_OURS = ("warmup_decay_log",)


def warmup_decay_log(step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning-rate factor of optimizer step `step` (0-based) under DeepSpeed's WarmupDecayLR with
    warmup_type "log", warmup_min_lr 0 and its scheduler stepped after each optimizer step: steps 0
    and 1 run at 0, then log(i + 1) / log(W) during the warmup (i = step - 1, W = max(2, warmup_steps)),
    then a linear decay reaching 0 at `total_steps`."""
    i = step - 1  # DeepSpeed's counter starts at -1 (lr 0) and is stepped after the optimizer
    w = max(2, warmup_steps)
    if i < 0:
        return 0.0
    if i < w:
        return math.log(i + 1) / math.log(w)
    return max(0.0, (total_steps - i) / max(1.0, total_steps - w))


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                    calls_per_step: int = 1, num_cycles: int = 1, power: float = 1.0):
    """A scheduler by name: "warmup_decay_log" or any `diffusers.optimization` name. `calls_per_step`:
    how many times `scheduler.step()` runs per optimizer step (accelerate steps a prepared scheduler
    once per process)."""
    if name == "warmup_decay_log":
        n = max(1, calls_per_step)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda calls: warmup_decay_log(calls // n, warmup_steps, total_steps))
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps * calls_per_step,
                         num_training_steps=total_steps * calls_per_step, num_cycles=num_cycles, power=power)
