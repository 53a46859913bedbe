"""HPO's default trial: a new study's first trial runs the training defaults, in the one worker whose lr slice
holds them (SearchSpace.default_params, enqueue_default_trial; bin/hpo.py --default-trial)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from utils import defaults as D
from utils.detection.hpo import HpoConfig, SearchSpace, enqueue_default_trial
from utils.detection.hpo_study import open_study

CONFIG = HpoConfig(epochs=1, image_size=96, workers=0, warmup_iters=1, seed=5)
SPACE = SearchSpace(batch_sizes=(2,))
DEFAULTS = {"lr": D.LR, "momentum": D.MOMENTUM, "weight_decay": D.WEIGHT_DECAY, "trainable_layers": D.TRAINABLE_LAYERS}


@pytest.mark.parametrize("workers", range(1, 7))
def test_exactly_one_worker_runs_the_defaults_and_its_slice_holds_them(workers):
    """#21: with one random trial per worker, the search picked lr 0.0024 over a diverged 0.047, far below the
    training default; the defaults now take part as the first trial of the worker whose lr slice holds them."""
    holders = [index for index in range(workers) if SPACE.default_params(index, workers) is not None]
    assert len(holders) == 1
    held = SPACE.for_worker(holders[0], workers)
    assert held.lr_min <= D.LR <= held.lr_max
    assert SPACE.default_params(holders[0], workers) == DEFAULTS


@pytest.mark.parametrize("outside", [{"lr_min": D.LR * 2}, {"lr_max": D.LR / 2},
                                     {"trainable_layers_max": D.TRAINABLE_LAYERS - 1},
                                     {"momentum_min": D.MOMENTUM + 0.01}, {"weight_decay_max": D.WEIGHT_DECAY / 2}])
def test_no_worker_runs_defaults_outside_the_space(outside):
    space = replace(SPACE, **outside)
    assert all(space.default_params(index, workers) is None for workers in (1, 2, 3) for index in range(workers))


def test_a_searched_batch_size_takes_the_default_batch_size_or_none():
    assert SearchSpace(batch_sizes=(2, D.BATCH_SIZE)).default_params(0, 1) == {**DEFAULTS, "batch_size": D.BATCH_SIZE}
    assert SearchSpace(batch_sizes=(D.BATCH_SIZE + 1, D.BATCH_SIZE + 2)).default_params(0, 1) is None


def test_the_default_trial_is_enqueued_once_in_a_new_study_and_can_be_turned_off(tmp_path):
    study, _ = open_study(tmp_path / "off.journal", "off", seed=1)
    enqueue_default_trial(study, replace(CONFIG, default_trial=False), SPACE, 0, 1)
    assert study.get_trials() == []
    enqueue_default_trial(study, CONFIG, SPACE, 1, 2)  # worker 1 of 2 holds D.LR, not worker 0 of 1's space
    assert len(study.get_trials()) == 1
    study, _ = open_study(tmp_path / "on.journal", "on", seed=1)
    enqueue_default_trial(study, CONFIG, SPACE, 0, 2)  # worker 0 of 2 does not hold the default rate
    assert study.get_trials() == []
    enqueue_default_trial(study, CONFIG, SPACE, 0, 1)
    enqueue_default_trial(study, CONFIG, SPACE, 0, 1)  # a study that holds trials gets none
    assert len(study.get_trials()) == 1
    trial = study.ask()
    assert SPACE.sample(trial) == pytest.approx(DEFAULTS) and trial.user_attrs["defaults"]
    assert SPACE.sample(study.ask()) != pytest.approx(DEFAULTS)  # the next one is drawn
