"""Timestep ranges, their annealing, and the SDS weightings w(t).

Timesteps are integers t in [0, N) with N the scheduler's `num_train_timesteps`; larger t is
noisier, for every guidance kind (for flow matching, sigma(t) ascends with t). A range (lo, hi) of
fractions becomes the integer steps [int(N lo), int(N hi)], both ends included, as threestudio's
`min_step` / `max_step`. Code that indexes a *descending* timestep list (RoMaP's SD3 guidance) means
index i = t N-1-i: its range (a, b) is (1 - (int(N b) + 1) / N, 1 - (int(N a) + 1) / N) here.
"""

from __future__ import annotations

import math

import torch

WEIGHTINGS = ("sds", "uniform", "fantasia3d")
ANNEALING = ("none", "linear", "sqrt")


def check_t_range(t_range, name: str = "t_range") -> tuple[float, float]:
    """(lo, hi) fractions with 0 <= lo <= hi <= 1, or a clear error."""
    try:
        lo, hi = (float(v) for v in t_range)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two fractions (lo, hi) in [0, 1], got {t_range!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"{name} must satisfy 0 <= lo <= hi <= 1, got {t_range!r}")
    return lo, hi


def t_bounds(t_range: tuple[float, float], num_train_timesteps: int) -> tuple[int, int]:
    """Integer steps (min_step, max_step), both inclusive, clamped to [0, N-1]."""
    n = int(num_train_timesteps)
    lo = min(max(int(n * t_range[0]), 0), n - 1)
    hi = min(max(int(n * t_range[1]), lo), n - 1)
    return lo, hi


def sample_timesteps(
    batch: int,
    t_range: tuple[float, float],
    num_train_timesteps: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """[B] int64 timesteps drawn uniformly from `t_bounds(t_range, N)` (one per sample)."""
    lo, hi = t_bounds(t_range, num_train_timesteps)
    gen_device = generator.device if generator is not None else "cpu"
    t = torch.randint(lo, hi + 1, (batch,), generator=generator, device=gen_device)
    return t.to(device)


def anneal_t_range(
    step: int,
    max_steps: int,
    start: tuple[float, float],
    end: tuple[float, float],
    mode: str = "linear",
) -> tuple[float, float]:
    """The timestep range at `step` of `max_steps`, moving from `start` to `end`.

    With p = step / max_steps clamped to [0, 1], mode "linear" uses p and "sqrt" sqrt(p)
    (fast early, as HiFA's square-root schedule); both ends move: range = start + (end - start) f(p).
    Mode "none" returns `start`. Step 0 gives `start`, step >= max_steps gives `end`.
    """
    if mode not in ANNEALING:
        raise ValueError(f"unknown timestep annealing {mode!r}; expected one of {', '.join(ANNEALING)}")
    if mode == "none":
        return tuple(start)
    if max_steps <= 0:
        raise ValueError(f"max_steps must be positive, got {max_steps}")
    p = min(max(step / max_steps, 0.0), 1.0)
    f = math.sqrt(p) if mode == "sqrt" else p
    return tuple(s + (e - s) * f for s, e in zip(start, end))


def sds_weight(alpha_bar: torch.Tensor, weighting: str) -> torch.Tensor:
    """w(t) from alpha_bar_t ([B]): "sds" 1 - a, "uniform" 1, "fantasia3d" sqrt(a) (1 - a)."""
    if weighting == "sds":
        return 1.0 - alpha_bar
    if weighting == "uniform":
        return torch.ones_like(alpha_bar)
    if weighting == "fantasia3d":
        return alpha_bar.sqrt() * (1.0 - alpha_bar)
    raise ValueError(f"unknown weighting {weighting!r}; expected one of {', '.join(WEIGHTINGS)}")


def check_weighting(weighting: str) -> str:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {', '.join(WEIGHTINGS)}")
    return weighting


def flow_sigmas(scheduler_config) -> torch.Tensor:
    """[N] training noise levels sigma(t) of a flow-matching scheduler, ascending in t.

    Built from a fresh `FlowMatchEulerDiscreteScheduler` with the pipeline's config (its
    static `shift` applied: sigma = shift s / (1 + (shift - 1) s), s = (t + 1) / N), so a
    `set_timesteps` call on the pipeline's own scheduler does not change it.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    return sched.sigmas.flip(0).to(torch.float32).clone()


def flow_alpha_bar(sigma: torch.Tensor) -> torch.Tensor:
    """The DDPM alpha_bar with the same signal-to-noise ratio as x = (1 - sigma) x0 + sigma eps."""
    a, s = (1.0 - sigma) ** 2, sigma**2
    return a / (a + s)
