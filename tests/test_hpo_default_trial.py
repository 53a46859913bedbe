"""HPO's default trial: a new study's first trial runs the training defaults, in the one worker whose lr slice
holds them (SearchSpace.default_params, enqueue_default_trial; bin/hpo.py --default-trial)."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import pytest
from optuna.trial import TrialState

from utils import defaults as D
from utils.detection.hpo import HpoConfig, SearchSpace, enqueue_default_trial
from utils.detection.hpo_study import open_study, recover_stale_trials

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


# LR on a boundary between slices, at an end of the range, or the range LR alone; the defaults' own range last
EDGES = [((1e-3, 1e-1), 2), ((1e-3, 1e-1), 4), ((1e-4, 1e-1), 3), ((1e-2, 1e-1), 3), ((1e-3, 1e-2), 3),
         ((1e-2, 1e-2), 1), ((1e-2, 1e-2), 3), (D.HPO_LR_RANGE, 3)]


@pytest.mark.parametrize(("lr_range", "workers"), EDGES)
def test_the_default_rate_on_a_slice_edge_runs_inside_its_workers_slice(lr_range, workers):
    """The worker was chosen by arithmetic on the whole range, its slice's ends by for_worker's exp(log(.)), which
    differ by a rounding: with --lr-range 1e-4 1e-1 and 3 workers, worker 2 ran the default 0.01 below its slice's
    low end 0.010000000000000004 (worker 1's slice holds it), with 1e-2 1e-1 no slice held it; Optuna warned that
    the fixed parameter was out of range and ran it outside the worker's slice."""
    space = replace(SPACE, lr_min=lr_range[0], lr_max=lr_range[1])
    holders = [index for index in range(workers) if space.default_params(index, workers) is not None]
    assert len(holders) == 1
    params = space.default_params(holders[0], workers)
    assert params["lr"] == pytest.approx(D.LR, rel=1e-12)
    held = space.for_worker(holders[0], workers).distributions()
    assert all(held[name]._contains(held[name].to_internal_repr(value)) for name, value in params.items())


def test_the_holders_default_trial_is_inside_its_slice_for_optuna(tmp_path):
    space, workers = replace(SPACE, lr_min=1e-4, lr_max=1e-1), 3
    (holder,) = [index for index in range(workers) if space.default_params(index, workers) is not None]
    study, _ = open_study(tmp_path / "edge.journal", "edge", seed=1)
    enqueue_default_trial(study, CONFIG, space, holder, workers)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Fixed parameter")  # Optuna's word for a value out of range
        sampled = space.for_worker(holder, workers).sample(study.ask())
    assert sampled == pytest.approx(DEFAULTS, rel=1e-12)


def _stand_in(trial) -> float:
    """A deterministic objective in place of training, peaked inside the space away from the defaults."""
    params = SPACE.sample(trial)
    return -(math.log10(params["lr"]) + 2.3) ** 2 - (params["momentum"] - 0.85) ** 2 - 0.01 * params["trainable_layers"]


def _searched(journal, n_trials: int) -> list[tuple]:
    """A job of the search as run_study runs it (a new study gets the default trial, a killed job's running trial is
    failed and enqueued again); the complete trials' parameters and default marks, in order."""
    study, storage = open_study(journal, "search", seed=7)
    enqueue_default_trial(study, CONFIG, SPACE, 0, 1)
    recover_stale_trials(study, storage)
    study.optimize(_stand_in, n_trials=n_trials - sum(t.state == TrialState.COMPLETE for t in study.trials))
    return [(t.params, bool(t.user_attrs.get("defaults"))) for t in study.trials if t.state == TrialState.COMPLETE]


@pytest.mark.parametrize("drawn", [True, False])
def test_a_default_trial_killed_runs_the_defaults_again_and_the_search_goes_on_as_an_uninterrupted_one(tmp_path,
                                                                                                     drawn):
    """A job killed in the default trial: its retry enqueued the parameters it had drawn without the default mark,
    and nothing at all where it was killed between Optuna's start of the trial and its draws (the defaults were
    only the enqueued trial's fixed parameters): the retry drew a random trial in place of the defaults."""
    whole = _searched(tmp_path / "whole.journal", 7)  # past TPE's 5 random startup trials
    assert whole[0] == (DEFAULTS, True) and not any(marked for _, marked in whole[1:])
    killed = tmp_path / "killed.journal"
    study, _ = open_study(killed, "search", seed=7)
    enqueue_default_trial(study, CONFIG, SPACE, 0, 1)
    trial = study.ask()  # the default trial, left RUNNING by the kill
    if drawn:
        assert SPACE.sample(trial) == DEFAULTS
    del study
    assert _searched(killed, 7) == whole
