"""Learning-rate schedules of recovery training, as pure functions of the optimizer step.

The factor multiplies the base learning rate eta_0 at optimizer step s (0-based) of S in all:

    warmup (s < W):  f(s) = (s + 1) / (W + 1)
    constant:        f(s) = 1
    cosine:          f(s) = 1/2 (1 + cos(pi p)),  p = min(1, (s - W) / max(1, S - W))

A function of the global step only (not of a scheduler's own counter), so a schedule rebuilt after a
compression stage, or restored from a checkpoint, continues where an uninterrupted run would be.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine")


def check_schedule(schedule: str, warmup: int) -> None:
    """Refuse an unknown schedule or a negative warmup (at construction, before any model loads)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule '{schedule}' is not one of {', '.join(SCHEDULES)}")
    if warmup < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup}")


def lr_factor(step: int, total: int, warmup: int = 0, schedule: str = "constant") -> float:
    """f(s) above: the multiple of the base learning rate at optimizer step ``step`` of ``total``."""
    check_schedule(schedule, warmup)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))
