"""An HPO worker's Optuna study: its journal (opened, repaired after a kill), its per-trial seeded TPE sampler, and
the trials a killed job left running, failed and enqueued again. The search itself (space, objective, run_study) is
utils/detection/hpo.py; this part imports no torch."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from .. import defaults as D
from .hpo_results import HpoError

log = logging.getLogger(__name__)

MAX_REQUEUES = D.HPO_MAX_REQUEUES
TPE_STARTUP_TRIALS = D.HPO_TPE_STARTUP_TRIALS


def worker_seed(seed: int, worker_index: int) -> int:
    """Worker *worker_index*'s sampler seed: seed + index, wrapped into the 32 bits Optuna's sampler takes (so
    that --seed 4294967295, the flag's largest, still gives every worker a seed of its own)."""
    return (seed + worker_index) % 2**32


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Optuna's TPESampler, made anew for every trial with a seed of (the search's seed, the trial's place among
    the study's trials that were not interrupted). A TPESampler seeded once draws every trial from one random
    stream, and the stream does not survive the job: a search resumed in a new process drew other trials than one
    run through with the same seed (seeding the resumed sampler past the trials done only kept it from drawing the
    first run's again). Here a trial's draws depend only on the seed, its place and the trials before it (all that TPE
    reads of the study, failed trials aside). An interrupted trial is marked failed and its parameters enqueued
    again (``requeue``): it takes no place, so the trials after it draw what they would have drawn. A trial that
    failed otherwise (its exception ended the job) keeps its place, so the retry draws other parameters."""

    def __init__(self, seed: int):
        self._seed = seed
        self._tpe = self._seeded(0)

    def _seeded(self, place: int) -> optuna.samplers.TPESampler:
        # SeedSequence mixes the pair: seed + place would give worker 0's second trial worker 1's first stream
        trial_seed = int(np.random.SeedSequence((self._seed, place)).generate_state(1)[0])
        return optuna.samplers.TPESampler(seed=trial_seed, n_startup_trials=TPE_STARTUP_TRIALS)

    def before_trial(self, study: optuna.Study, trial) -> None:
        trials = study.get_trials(deepcopy=False)
        # Only an interrupted trial (its parameters enqueued again: requeued_from) gives up its place. One that
        # failed otherwise (an exception ended the job: CUDA out of memory at a large batch) keeps it, or the retry
        # drew its very parameters again, from the same seed and history, and failed the same way every time.
        requeued = {t.user_attrs.get("requeued_from") for t in trials}
        place = sum(1 for earlier in trials if earlier.number < trial.number
                    and not (earlier.state == TrialState.FAIL and earlier.number in requeued))
        self._tpe = self._seeded(place)
        self._tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._tpe.after_trial(study, trial, state, values)


def open_study(journal, study_name: str, seed: int, pruner_startup_trials: int = D.HPO_PRUNER_STARTUP_TRIALS,
               pruner_warmup_epochs: int = D.HPO_PRUNER_WARMUP_EPOCHS) -> tuple[optuna.Study, JournalStorage]:
    journal = Path(journal)
    journal.parent.mkdir(parents=True, exist_ok=True)
    _trim_partial_line(journal)
    _remove_stale_lock(journal)
    try:
        # absolute: Optuna's lock links to the path as given, and a link to "runs/x/hpo.journal" in runs/x dangles,
        # which Optuna's grace period for a dead writer's lock cannot read (another client of the journal then
        # waits for ever)
        storage = JournalStorage(JournalFileBackend(str(journal.absolute())))
        study = optuna.create_study(
            study_name=study_name, storage=storage, direction="maximize", load_if_exists=True,
            sampler=TrialSeededSampler(seed),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=pruner_startup_trials,
                                               n_warmup_steps=pruner_warmup_epochs))
        study.get_trials(deepcopy=False)  # reads the journal: a damaged one fails here, as one error
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AssertionError) as error:  # Optuna's own words
        raise HpoError(f"{journal}: not a readable Optuna journal ({type(error).__name__}: "
                       f"{' '.join(str(error).split())[:200]}); move it away to start the search afresh") from None
    return study, storage


def _trim_partial_line(journal: Path) -> None:
    """Cut a last line a killed job left half written (every journal entry ends in a newline), so that the
    journal reads again; the cut text is logged."""
    if not journal.is_file() or journal.stat().st_size == 0:
        return
    with open(journal, "rb+") as handle:
        handle.seek(-1, 2)
        if handle.read(1) == b"\n":
            return
        handle.seek(0)
        data = handle.read()
        keep = data.rfind(b"\n") + 1
        log.warning("%s: its last line was cut short (%d bytes, an interrupted write); removed", journal,
                    len(data) - keep)
        handle.truncate(keep)


STALE_LOCK_S = 30  # Optuna's grace period for a journal writer's lock (JournalFileSymlinkLock's grace_period)


def _remove_stale_lock(journal: Path) -> None:
    """Remove the lock a job killed in the middle of a journal write left (Optuna's JournalFileSymlinkLock: a
    symlink ``<journal>.lock``, there while a write is under way, a few milliseconds). Optuna releases one after
    STALE_LOCK_S, but one that leads nowhere (linked relative to the job's folder by a version that gave Optuna the
    path as given, or in a folder moved since) never: its grace period reads the lock through the link. A young
    lock that leads to the journal is left to Optuna: it may be a live write of another worker given the same
    journal by hand (each of the workflow's hpo jobs has its own), whose release would fail were it removed."""
    lock = journal.with_name(journal.name + ".lock")  # optuna.storages.journal._file.LOCK_FILE_SUFFIX
    try:
        age = time.time() - lock.lstat().st_mtime
    except FileNotFoundError:
        return
    if lock.exists() and age < STALE_LOCK_S:
        return
    log.warning("%s: a lock left by a job killed while it wrote the journal; removed", lock)
    lock.unlink(missing_ok=True)


def requeue(study: optuna.Study, trial, why: str) -> None:
    """Enqueue an interrupted trial's parameters again (at most MAX_REQUEUES times): those it drew, over those it
    was enqueued with (Optuna's fixed_params: a trial killed before its draws has none of its own), and the mark of
    the default trial (hpo.enqueue_default_trial), so that its retry runs, and is shown as, the training defaults."""
    requeues = int(trial.user_attrs.get("requeues", 0))
    if requeues >= MAX_REQUEUES:
        log.warning("trial %d was interrupted %d times; not enqueued again", trial.number, requeues + 1)
        return
    params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
    marks = {"defaults": True} if trial.user_attrs.get("defaults") else {}
    study.enqueue_trial(params, user_attrs={**marks, "requeued_from": trial.number, "requeues": requeues + 1})
    log.info("trial %d %s: marked failed, parameters %s enqueued again", trial.number, why, params)


def recover_stale_trials(study: optuna.Study, storage) -> list[int]:
    """Fail trials left RUNNING by a killed job and enqueue their parameters again; returns their numbers."""
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        recovered.append(trial.number)
        requeue(study, trial, "was left running by an interrupted job")
    return recovered


def trial_counts(study: optuna.Study) -> dict:
    counts = {state.name.lower(): 0 for state in TrialState}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name.lower()] += 1
    counts["finished"] = counts["complete"] + counts["pruned"]
    return counts
