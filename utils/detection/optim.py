"""The optimizer, its per-iteration learning-rate schedule and the mixed-precision grad scaler of a training run.

The schedule is a LambdaLR over an :class:`LrSchedule`, a callable object whose fields LambdaLR's state_dict
keeps, so that a checkpoint restores it and ``set_schedule_length`` changes its length through that state.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import defaults as D
from ..errors import InputError


def build_optimizer(model: nn.Module, name: str = D.OPTIMIZER, lr: float = D.LR, momentum: float = D.MOMENTUM,
                    weight_decay: float = D.WEIGHT_DECAY) -> torch.optim.Optimizer:
    """SGD with momentum, or AdamW, over every parameter that may train.

    Parameters frozen only for the first epochs of a two-stage schedule are
    included: they get no gradient while frozen, and both optimizers skip
    parameters without one. Biases and normalisation weights get no decay.
    """
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        (decay if parameter.ndim > 1 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        # momentum plays beta1 so that one search space serves both optimizers
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
    raise InputError(f"unknown optimizer {name!r}: use sgd or adamw")


def lr_factor(iteration: int, total_iters: int, warmup_iters: int, schedule: str = D.LR_SCHEDULE,
              warmup_factor: float = D.LR_WARMUP_START_FACTOR, steps=D.LR_STEP_MILESTONES,
              gamma: float = D.LR_STEP_GAMMA, min_factor: float = D.LR_COSINE_MIN_FACTOR) -> float:
    """Multiplier of the base learning rate at *iteration* (0-based): linear warm-up, then cosine or steps."""
    warmup_iters = min(warmup_iters, max(total_iters - 1, 0))
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        return warmup_factor * (1 - alpha) + alpha
    if schedule == "cosine":
        span = max(total_iters - warmup_iters, 1)
        progress = min((iteration - warmup_iters) / span, 1.0)
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "step":
        passed = sum(iteration >= int(step * total_iters) for step in steps)
        return gamma ** passed
    raise InputError(f"unknown learning-rate schedule {schedule!r}: use cosine or step")


class LrSchedule:
    """The learning-rate factor per iteration, as a callable object so that LambdaLR's state_dict keeps its
    fields (plain numbers) and ``total_iters`` can be changed mid-run: a --time-budget run sets the
    schedule's length only after timing its first steps."""

    def __init__(self, total_iters: int, warmup_iters: int = D.WARMUP_ITERS, schedule: str = D.LR_SCHEDULE,
                 steps=D.LR_STEP_MILESTONES, gamma: float = D.LR_STEP_GAMMA):
        lr_factor(0, total_iters, warmup_iters, schedule)  # validates the schedule name now
        self.total_iters = int(total_iters)
        self.warmup_iters = int(warmup_iters)
        self.schedule = schedule
        self.steps = list(steps)
        self.gamma = float(gamma)

    def __call__(self, iteration: int) -> float:
        return lr_factor(iteration, self.total_iters, self.warmup_iters, self.schedule, steps=self.steps,
                         gamma=self.gamma)


def build_scheduler(optimizer, total_iters: int, warmup_iters: int = D.WARMUP_ITERS, schedule: str = D.LR_SCHEDULE,
                    steps=D.LR_STEP_MILESTONES, gamma: float = D.LR_STEP_GAMMA) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration LambdaLR over an :class:`LrSchedule` (its length changed by set_schedule_length)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LrSchedule(total_iters, warmup_iters, schedule,
                                                                   steps=steps, gamma=gamma))


def set_schedule_length(scheduler: torch.optim.lr_scheduler.LambdaLR, total_iters: int) -> None:
    """Give *scheduler*'s :class:`LrSchedule` a new length, through LambdaLR's own state_dict (which holds the
    schedule's fields): the iterations already run keep their rates, and so does the next one, whose rate
    the last ``step()`` has already set. A time budget's plan changes the length mid-run."""
    state = scheduler.state_dict()
    for schedule in state["lr_lambdas"]:  # one per parameter group, all the same LrSchedule
        schedule["total_iters"] = int(total_iters)
    scheduler.load_state_dict(state)


def make_grad_scaler(device: torch.device, amp: bool):
    return torch.amp.GradScaler("cuda") if amp and device.type == "cuda" else None
