"""One training plan: the epochs, stages, step limit and time budget of a run, made once from the flags.

``make_plan(params)`` is the one place where the schedule's flags are checked against each other
(--epochs, --stages, --freeze-backbone-epochs, --max-steps, --time-budget, --budget-plan) and the
stages' trainable layers against the backbone's (model.BACKBONE_STAGES); it
returns a frozen :class:`TrainingPlan`. Nothing sets a flag afterwards: a time budget fitting the
plan, a recorded budget plan replayed, or a checkpoint's plan resumed each return a new plan
(``with_steps``, ``fitted``, ``resumed``), which the Trainer puts in place of the old one.

Stages stay :class:`~utils.detection.stages.Stage` objects here; ``as_record`` turns the plan into
the plain values a checkpoint, a model file or a run record holds, and ``resumed`` reads them back.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

from ..errors import InputError, shown
from .model import BACKBONE_STAGES
from .params import check_budget_plan
from .stages import Stage, StagesError, parse_stages, scale_stages, stage_at, total_epochs

log = logging.getLogger(__name__)


class PlanError(InputError):
    """Flags of the training schedule that are out of range or exclude each other."""


MAX_TIME_BUDGET_MINUTES = 365 * 24 * 60  # a longer budget is a slip of the keyboard

@dataclass(frozen=True)
class TrainingPlan:
    """What a run trains, epoch by epoch; frozen: a change is a new plan.

    epochs: epochs in all (a staged run: its stages' sum; a step limit: the epochs it reaches into).
    stages: a staged run's stages as trained (a budget scales them), each with its own optimizer and
        warm-up + cosine; None: one schedule over all epochs.
    requested_stages: the stages as asked for (what a budget scales, and what a checkpoint must match).
    freeze_backbone_epochs: a one-schedule run's first epochs with the backbone frozen.
    max_steps: training steps in all, the last epoch cut short (None: whole epochs).
    time_budget: minutes the plan is fitted to during the first epoch (None: no budget).
    budget_plan: a budget run's [first, final] plans in steps: given, replayed in place of the clock;
        once fitted, what this run planned (what --budget-plan replays).
    fitting: the budget (or the recorded budget plan) still fits this plan in the first epoch.
    """

    epochs: int
    stages: tuple[Stage, ...] | None = None
    requested_stages: tuple[Stage, ...] | None = None
    freeze_backbone_epochs: int = 0
    max_steps: int | None = None
    time_budget: float | None = None
    budget_plan: tuple[int | None, int] | None = None
    fitting: bool = False

    @property
    def staged(self) -> bool:
        return self.stages is not None

    def stage_at(self, epoch: int) -> int:
        """0-based index of the stage the run's 0-based *epoch* belongs to (0 for a one-schedule run)."""
        return stage_at(self.stages, epoch)[0] if self.staged else 0

    def schedule_steps(self, stage_index: int, steps_per_epoch: int) -> int:
        """The length of the learning-rate schedule running in stage *stage_index*, in steps."""
        if self.staged:
            return self.stages[stage_index].epochs * steps_per_epoch
        return self.max_steps if self.max_steps is not None else self.epochs * steps_per_epoch

    def steps_left_in_epoch(self, completed_epochs: int, steps_per_epoch: int) -> int | None:
        """The steps epoch *completed_epochs* + 1 may take under max_steps (None: the whole epoch)."""
        return None if self.max_steps is None else self.max_steps - completed_epochs * steps_per_epoch

    def steps_done(self, completed_epochs: int, steps_per_epoch: int) -> int:
        steps = completed_epochs * steps_per_epoch
        return steps if self.max_steps is None else min(steps, self.max_steps)

    def with_steps(self, steps: int, steps_per_epoch: int) -> TrainingPlan:
        """This plan fitted to *steps* training steps in all (a budget's plan): the epochs, the last one cut
        short there. A staged run scales its requested stages' epochs instead, in whole epochs (at least one
        per stage)."""
        if not self.staged:
            max_steps = max(1, int(steps))
            return replace(self, max_steps=max_steps, epochs=math.ceil(max_steps / steps_per_epoch))
        fitting = int(steps) // steps_per_epoch
        epochs = max(len(self.requested_stages), fitting)
        stages = tuple(scale_stages(self.requested_stages, epochs))
        kept = "" if epochs == fitting else (f" (every stage keeps one whole epoch: {epochs}, so this run "
                                             "outlasts its budget)")
        log.info("time budget: %d steps fit %d whole epoch(s)%s; the stages' epochs fitted to it: %s", steps,
                 fitting, kept, ", ".join(f"{new.label(number)} {old.epochs} -> {new.epochs}" for number, (old, new)
                                          in enumerate(zip(self.requested_stages, stages), start=1)))
        return replace(self, stages=stages, epochs=total_epochs(stages))

    def fitted(self, first: int | None, final: int, steps_per_epoch: int) -> TrainingPlan:
        """The budget's final plan after the first epoch, recorded with its first one; no longer fitting."""
        return replace(self.with_steps(final, steps_per_epoch), budget_plan=(first, final), fitting=False)

    def resumed(self, saved: dict, steps_per_epoch: int, where: str) -> TrainingPlan:
        """The plan an interrupted run of this request recorded in its checkpoint (*saved*: ``as_record``'s
        values): a budget run's fitted plan is kept, not fitted again."""
        plan = self
        if self.fitting:
            recorded = saved.get("budget_plan")
            plan = replace(plan, budget_plan=tuple(recorded) if recorded is not None else None)
        if self.staged:
            stages = tuple(parse_stages(saved["stages"], f"{where}: stages"))
            return replace(plan, stages=stages, epochs=total_epochs(stages), fitting=False)
        if self.fitting and saved.get("max_steps") is not None:
            return replace(plan.with_steps(saved["max_steps"], steps_per_epoch), fitting=False)
        return plan

    def as_record(self) -> dict:
        """The plan's values as TrainParams names them, for a checkpoint, a model file or a run record."""
        return {"epochs": self.epochs, "max_steps": self.max_steps,
                "stages": [stage.to_dict() for stage in self.stages] if self.staged else None,
                "budget_plan": list(self.budget_plan) if self.budget_plan is not None else None}

    def requested_record(self) -> list[dict] | None:
        return [stage.to_dict() for stage in self.requested_stages] if self.staged else None


def make_plan(params) -> TrainingPlan:
    """The plan of *params* (TrainParams, or anything with its schedule fields and backbone), every exclusion
    checked here.

    --stages replace --epochs and exclude --freeze-backbone-epochs and --max-steps, and no stage trains more
    layers than the backbone has stages; --max-steps excludes --budget-plan (whose final number is the steps in
    all); --roi-bg-iou is at most --roi-fg-iou. Raises PlanError or StagesError in one line.
    """
    stages = tuple(parse_stages(params.stages, "--stages")) if params.stages is not None else None
    if stages is not None:
        if params.freeze_backbone_epochs:
            raise StagesError(f"--stages: cannot be combined with freeze_backbone_epochs="
                              f"{shown(params.freeze_backbone_epochs)} (flag or params file); give a first stage "
                              "with trainable_layers: 0 instead")
        if params.max_steps is not None:
            raise StagesError("--stages: cannot be combined with --max-steps; the stages' epochs are the plan "
                              "(a --time-budget run records its fitted stages in the model file)")
        if params.epochs != total_epochs(stages):
            log.info("--stages: %d epochs in %d stages replace --epochs %d", total_epochs(stages), len(stages),
                     params.epochs)
    elif params.epochs < 1:
        raise PlanError(f"--epochs must be at least 1, got {shown(params.epochs)}")
    if params.max_steps is not None and params.max_steps < 1:
        raise PlanError(f"--max-steps must be at least 1, got {shown(params.max_steps)}")
    if params.time_budget is not None and not params.time_budget > 0:  # NaN too
        raise PlanError(f"--time-budget must be a positive number of minutes, got {shown(params.time_budget)}")
    if params.time_budget is not None and params.time_budget > MAX_TIME_BUDGET_MINUTES:
        # beyond ~1e306 the budget's seconds overflowed to inf and the fit of the plan failed mid-epoch (a traceback)
        raise PlanError(f"--time-budget must be at most {MAX_TIME_BUDGET_MINUTES} minutes (365 days), got "
                        f"{shown(params.time_budget)}")
    fg_iou, bg_iou = getattr(params, "roi_fg_iou", None), getattr(params, "roi_bg_iou", None)
    if fg_iou is not None and bg_iou is not None and bg_iou > fg_iou:
        raise PlanError(f"--roi-bg-iou {shown(bg_iou)} is above --roi-fg-iou {shown(fg_iou)}: a proposal would count "
                        "as a face and as background")
    if params.max_steps is not None and params.budget_plan is not None:
        raise PlanError("--max-steps and --budget-plan: give one (the budget plan's final number is the "
                        "steps in all)")
    available = BACKBONE_STAGES.get(params.backbone)  # an unknown backbone is build_model's one line
    for number, stage in enumerate(stages or (), start=1):
        if available is not None and stage.trainable_layers is not None and stage.trainable_layers > available:
            raise StagesError(f"--stages: stage {number}: key 'trainable_layers' is {shown(stage.trainable_layers)}, "
                              f"but backbone {params.backbone} has {available} stages")
    budget_plan = (tuple(check_budget_plan(params.budget_plan, "--budget-plan"))
                   if params.budget_plan is not None else None)
    return TrainingPlan(epochs=total_epochs(stages) if stages is not None else params.epochs, stages=stages,
                        requested_stages=stages, freeze_backbone_epochs=params.freeze_backbone_epochs,
                        max_steps=params.max_steps, time_budget=params.time_budget or None,
                        budget_plan=budget_plan, fitting=budget_plan is not None or bool(params.time_budget))
