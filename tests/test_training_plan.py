"""The one training plan (utils.detection.training_plan): every exclusion of the schedule's flags is checked
in make_plan, the plan is frozen, and a budget's fit returns a new plan."""

from __future__ import annotations

import dataclasses

import pytest

from utils.detection.model import BACKBONE_STAGES, BACKBONES, build_model
from utils.detection.stages import Stage, StagesError
from utils.detection.params import TrainParams
from utils.detection.training_plan import PlanError, make_plan
from utils.errors import InputError

TWO_STAGES = [{"epochs": 1, "trainable_layers": 0}, {"epochs": 3}]


@pytest.mark.parametrize("flags, error, message", [
    ({"epochs": 0}, PlanError, "--epochs must be at least 1, got 0"),
    ({"max_steps": 0}, PlanError, "--max-steps must be at least 1, got 0"),
    ({"time_budget": 0.0}, PlanError, "--time-budget must be a positive number of minutes, got 0.0"),
    ({"time_budget": -1.0}, PlanError, "--time-budget must be a positive number of minutes"),
    ({"time_budget": float("nan")}, PlanError, "--time-budget must be a positive number of minutes, got nan"),
    ({"time_budget": 1e308}, PlanError, "--time-budget must be at most 525600 minutes (365 days), got 1e+308"),
    ({"max_steps": 4, "budget_plan": [2, 4]}, PlanError, "--max-steps and --budget-plan: give one"),
    ({"budget_plan": [0, 4]}, InputError, "--budget-plan: the first plan must be a positive number of steps"),
    ({"stages": TWO_STAGES, "freeze_backbone_epochs": 1}, StagesError,
     "--stages: cannot be combined with freeze_backbone_epochs=1"),
    ({"stages": TWO_STAGES, "max_steps": 5}, StagesError, "--stages: cannot be combined with --max-steps"),
    ({"stages": [{"epochs": 0}]}, StagesError, "--stages: stage 1: key 'epochs' must be an integer >= 1"),
])
def test_each_exclusion_is_one_line_from_make_plan(flags, error, message):
    with pytest.raises(error) as raised:
        make_plan(TrainParams(**flags))
    assert message in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("flags", [{"epochs": -10 ** 4000}, {"max_steps": -10 ** 4000},
                                   {"stages": TWO_STAGES, "freeze_backbone_epochs": 10 ** 4000}])
def test_a_huge_value_is_quoted_shortened(flags):
    """A value from code or a params file is not bounded by a flag's type here: the message shows it cut."""
    with pytest.raises(InputError) as raised:
        make_plan(TrainParams(**flags))
    assert len(str(raised.value)) < 300 and "..." in str(raised.value)


def test_more_trainable_layers_than_the_backbone_has_are_refused():
    """Checked in make_plan with the other flags, from the table of each backbone's stages: before a model is built."""
    make_plan(TrainParams(backbone="mobilenet_v2_fpn", stages=[{"epochs": 1, "trainable_layers": 6}]))
    with pytest.raises(StagesError, match="stage 1: key 'trainable_layers' is 6, but backbone resnet50_fpn has 5"):
        make_plan(TrainParams(backbone="resnet50_fpn", stages=[{"epochs": 1, "trainable_layers": 6}]))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_the_table_of_backbone_stages_is_what_build_model_builds(backbone):
    model = build_model(backbone, weights="none", trainable_layers=0)
    assert len(model.backbone_stages) == BACKBONE_STAGES[backbone]


def test_the_plan_is_frozen_and_a_fit_returns_a_new_plan():
    plan = make_plan(TrainParams(epochs=9, time_budget=5.0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.epochs = 3
    assert plan.fitting and plan.max_steps is None
    first = plan.with_steps(10, steps_per_epoch=4)
    assert (first.max_steps, first.epochs, first.fitting) == (10, 3, True)
    final = first.fitted(10, 7, steps_per_epoch=4)
    assert (final.max_steps, final.epochs, final.budget_plan, final.fitting) == (7, 2, (10, 7), False)
    assert (plan.epochs, plan.max_steps) == (9, None)  # the old plan is unchanged
    assert final.as_record() == {"epochs": 2, "max_steps": 7, "stages": None, "budget_plan": [10, 7]}


def test_stages_replace_epochs_and_a_budget_scales_them_in_whole_epochs():
    plan = make_plan(TrainParams(epochs=99, stages=TWO_STAGES))
    assert plan.epochs == 4 and plan.stages == (Stage(1, trainable_layers=0), Stage(3))
    assert [plan.stage_at(epoch) for epoch in range(4)] == [0, 1, 1, 1]
    scaled = plan.with_steps(8 * 5 + 1, steps_per_epoch=5)
    assert [stage.epochs for stage in scaled.stages] == [2, 6] and scaled.epochs == 8
    assert scaled.requested_stages == plan.stages and scaled.max_steps is None
    assert scaled.schedule_steps(0, 5) == 10 and scaled.schedule_steps(1, 5) == 30
    assert scaled.requested_record() == [{"epochs": 1, "trainable_layers": 0}, {"epochs": 3}]


def test_a_recorded_budget_plan_is_replayed_and_a_checkpoint_plan_resumed():
    replay = make_plan(TrainParams(epochs=9, budget_plan=[None, 4]))
    assert replay.fitting and replay.budget_plan == (None, 4)
    resumed = replay.resumed({"max_steps": 4, "budget_plan": [None, 4]}, steps_per_epoch=3, where="c.pt")
    assert (resumed.max_steps, resumed.epochs, resumed.fitting, resumed.budget_plan) == (4, 2, False, (None, 4))
    staged = make_plan(TrainParams(stages=TWO_STAGES, time_budget=1.0))
    back = staged.resumed({"stages": [{"epochs": 2, "trainable_layers": 0}, {"epochs": 6}], "budget_plan": [9, 41]},
                          steps_per_epoch=5, where="c.pt")
    assert [s.epochs for s in back.stages] == [2, 6] and back.epochs == 8 and not back.fitting
    assert back.budget_plan == (9, 41)
