"""Hyperparameter search with Optuna: resumable, prunable, split across workers.

Objective: Ultralytics' fitness 0.1 * mAP@0.5 + 0.9 * mAP@0.5:0.95 (or plain
COCO mAP with objective="map") on the validation set, from predictions made in
eval mode after every epoch; never a loss computed in train mode. Every epoch
is reported with ``trial.report`` and a MedianPruner stops trials below the
median of earlier trials at the same epoch.

The compliance error (predicted minus true percent of faces properly masked, at
the operating score threshold) is recorded for every epoch and trial but is not
the objective: on a validation split of a few dozen images one face moves it by
several points, and it depends on the score threshold, which is chosen for the
final model after the search; mAP ranks detectors over all thresholds.

Storage (utils/detection/hpo_study.py): ``JournalStorage(JournalFileBackend(checkpoint))``. One worker owns one
journal, so a trial found RUNNING (or a write's stale lock) when a job starts was left by a killed run:
it is marked FAIL and its parameters are enqueued again (at most
MAX_REQUEUES times). ``n_trials`` is the total of finished (complete + pruned)
trials the study should hold, so a rerun only runs what is missing.

Sampling: TPE (``TrialSeededSampler``), seeded afresh for every trial from the worker's seed and the trial's
place among the study's trials that were not interrupted, so that a search stopped or killed and resumed draws
the trials an uninterrupted one with the same seed draws.

Default trial: a new study's first trial runs the training defaults (LR, MOMENTUM, WEIGHT_DECAY,
TRAINABLE_LAYERS) in the one worker whose slice holds LR (``HpoConfig.default_trial``), so that the best
trial is never one that scored below them; the search's budget is often one trial per worker.

Workers: with K workers, worker I searches the I-th of K equal slices of the
log learning-rate range (disjoint, together the whole range) with its own
TPE seed (seed + I, modulo 2**32: worker_seed); momentum, weight decay and trainable layers span their
full ranges in every worker. The learning rate matters most for detection
fine-tuning, so slicing it spreads the K jobs over genuinely different
regions instead of K samplers converging on the same one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, replace

import optuna
from optuna.distributions import FloatDistribution, IntDistribution, CategoricalDistribution
from optuna.trial import TrialState

from .. import defaults as D
from ..classes import NO_LABEL_MAP, LabelMap
from ..cli import print_skipped
from ..errors import shown
from ..stop import StopRequested
from .compliance import compliance_error
from .engine import NonFiniteLossError
# defined with the merge, which reads result files without torch; named here, where the search raises and writes them
from .hpo_results import HpoError, trial_records
from .hpo_study import open_study, recover_stale_trials, requeue, trial_counts, worker_seed
from .metrics import coco_map
from .metrics import fitness as coco_fitness
from ..data.pairs import object_problems, object_problems_line, open_pairs, pairs_sha256
from .params import TrainParams
from .recipe import too_thin_to_train
from .training import Trainer

log = logging.getLogger(__name__)


@dataclass
class SearchSpace:
    lr_min: float = D.HPO_LR_RANGE[0]
    lr_max: float = D.HPO_LR_RANGE[1]
    momentum_min: float = D.HPO_MOMENTUM_RANGE[0]
    momentum_max: float = D.HPO_MOMENTUM_RANGE[1]
    weight_decay_min: float = D.HPO_WEIGHT_DECAY_RANGE[0]
    weight_decay_max: float = D.HPO_WEIGHT_DECAY_RANGE[1]
    trainable_layers_min: int = D.HPO_TRAINABLE_LAYERS_RANGE[0]
    trainable_layers_max: int = D.HPO_TRAINABLE_LAYERS_RANGE[1]
    batch_sizes: tuple[int, ...] = D.HPO_BATCH_SIZES

    def for_worker(self, worker_index: int, num_workers: int) -> "SearchSpace":
        """This worker's disjoint slice of the log learning-rate range."""
        if num_workers < 1 or not 0 <= worker_index < num_workers:
            raise HpoError(f"worker index {worker_index} is not in 0..{num_workers - 1}")
        low, high = math.log(self.lr_min), math.log(self.lr_max)
        step = (high - low) / num_workers
        return replace(self, lr_min=math.exp(low + step * worker_index),
                       lr_max=math.exp(low + step * (worker_index + 1)))

    def distributions(self) -> dict:
        dists = {
            "lr": FloatDistribution(self.lr_min, self.lr_max, log=True),
            "momentum": FloatDistribution(self.momentum_min, self.momentum_max),
            "weight_decay": FloatDistribution(self.weight_decay_min, self.weight_decay_max, log=True),
            "trainable_layers": IntDistribution(self.trainable_layers_min, self.trainable_layers_max),
        }
        if len(self.batch_sizes) > 1:
            dists["batch_size"] = CategoricalDistribution(list(self.batch_sizes))
        return dists

    def default_params(self, worker_index: int, num_workers: int) -> dict | None:
        """The training defaults' parameters (LR, MOMENTUM, WEIGHT_DECAY, TRAINABLE_LAYERS; BATCH_SIZE when batch
        sizes are searched) if they lie in this whole space and LR in worker *worker_index*'s slice of it: one
        worker of K holds them (the lowest where LR is on the boundary of two slices); None for the others."""
        params = {"lr": D.LR, "momentum": D.MOMENTUM, "weight_decay": D.WEIGHT_DECAY,
                  "trainable_layers": D.TRAINABLE_LAYERS}
        if len(self.batch_sizes) > 1:
            params["batch_size"] = D.BATCH_SIZE
        dists = self.distributions()
        def holds(dist, value) -> bool:
            try:
                return dist._contains(dist.to_internal_repr(value))
            except ValueError:  # a categorical's value not among its choices
                return False

        if not all(holds(dists[name], value) for name, value in params.items()):
            return None
        # The slices themselves (for_worker), not arithmetic on the whole range: their ends are exp(log(.)), a
        # rounding off LR where it is a slice's boundary or an end of the range, and the default trial ran outside
        # its worker's slice (Optuna: "out of range"), or in a worker whose neighbour's slice held it. At an end of
        # the range LR goes inside the slice, by that rounding.
        slices = [self.for_worker(index, num_workers) for index in range(num_workers)]
        lrs = [min(max(D.LR, part.lr_min), part.lr_max) for part in slices]
        holder = min(range(num_workers), key=lambda index: (abs(lrs[index] - D.LR), index))
        return {**params, "lr": lrs[holder]} if holder == worker_index else None

    def describe(self) -> dict:
        return {name: repr(dist) for name, dist in self.distributions().items()}

    def sample(self, trial: optuna.Trial) -> dict:
        params = {
            "lr": trial.suggest_float("lr", self.lr_min, self.lr_max, log=True),
            "momentum": trial.suggest_float("momentum", self.momentum_min, self.momentum_max),
            "weight_decay": trial.suggest_float("weight_decay", self.weight_decay_min, self.weight_decay_max,
                                                log=True),
            "trainable_layers": trial.suggest_int("trainable_layers", self.trainable_layers_min,
                                                  self.trainable_layers_max),
        }
        if len(self.batch_sizes) > 1:
            params["batch_size"] = trial.suggest_categorical("batch_size", list(self.batch_sizes))
        return params


def fitness(summary: dict, objective: str = "fitness") -> float:
    value = coco_fitness(summary)
    if value is None:
        raise HpoError("validation mAP is undefined: the validation set has no labelled faces")
    return float(summary["map"]) if objective == "map" else value


# ----------------------------------------------------------------------------- study handling

# What a study's search record holds since later versions: a journal that did not record one is not refused for it.
LATER_SEARCH_KEYS = ("label_map", "inputs_sha256")


def check_study_search(study: optuna.Study, journal, config: HpoConfig, space: SearchSpace,
                       inputs_sha256: str | None = None) -> None:
    """Record what the study searches (the fixed training settings, the label map, the space and the hash of
    the training and validation files, *inputs_sha256*) in a new study; refuse to continue one that searched
    something else (HpoError): its trials' values would be compared with the new ones, and the best could be
    a trial run at other epochs, another size or on other data."""
    search = {"epochs": config.epochs, "image_size": config.image_size, "backbone": config.backbone,
              "weights": config.weights, "optimizer": config.optimizer, "warmup_iters": config.warmup_iters,
              "objective": config.objective, "seed": config.seed, "space": space.describe(),
              "label_map": config.label_map.as_dict()}
    if inputs_sha256 is not None:
        search["inputs_sha256"] = inputs_sha256
    recorded = study.user_attrs.get("search")
    if recorded is None:
        if not study.get_trials(deepcopy=False):  # a journal from before this record is trusted as it was
            study.set_user_attr("search", search)
        return
    changed = sorted(key for key in search if (key in recorded or key not in LATER_SEARCH_KEYS)
                     and recorded.get(key) != search[key])
    if "inputs_sha256" in changed:
        raise HpoError(f"{journal}: its study searched on other training or validation data (inputs sha256 "
                       f"{recorded['inputs_sha256'][:12]}…, this run's {inputs_sha256[:12]}…); move the journal "
                       "away to start the search afresh, or search the data it was written for")
    if changed:
        first = changed[0]
        raise HpoError(f"{journal}: its study searched with {first}={shown(recorded.get(first))}, this run has "
                       f"{shown(search[first])} ({', '.join(changed)} differ); move the journal away to start the "
                       "search afresh, or match the flags")


@contextlib.contextmanager
def _quiet_about_stops():
    """Optuna logs every trial that raises with its traceback; a SIGTERM's stop is not a failure to show so
    (the job says it in one line), while other failures keep theirs."""
    def not_a_stop(record) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], StopRequested))

    handlers = logging.getLogger("optuna").handlers
    for handler in handlers:
        handler.addFilter(not_a_stop)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(not_a_stop)


def enqueue_default_trial(study: optuna.Study, config: HpoConfig, space: SearchSpace, worker_index: int,
                          num_workers: int) -> None:
    """Make the training defaults a new study's first trial, in the worker whose slice holds them (HPO_DEFAULT_TRIAL).
    Only a study without trials gets it: a resumed one already holds it, finished or waiting."""
    params = space.default_params(worker_index, num_workers) if config.default_trial else None
    if params is None or study.get_trials(deepcopy=False):
        return
    study.enqueue_trial(params, user_attrs={"defaults": True})
    log.info("trial 0 runs the training defaults %s", params)


# ----------------------------------------------------------------------------- the objective

@dataclass
class HpoConfig:
    epochs: int = D.HPO_EPOCHS
    image_size: int = D.IMAGE_SIZE
    backbone: str = D.BACKBONE
    weights: str = D.WEIGHTS
    weights_file: str | None = None
    optimizer: str = D.OPTIMIZER
    workers: int = D.LOADER_WORKERS  # -1: utils.detection.training.auto_workers
    warmup_iters: int = D.HPO_WARMUP_ITERS
    objective: str = D.HPO_OBJECTIVE
    seed: int = D.SEED
    score_threshold: float = D.SCORE_THRESHOLD  # where the compliance error of each trial is read (reported only)
    label_map: LabelMap = NO_LABEL_MAP  # how the annotations' object names become classes
    default_trial: bool = D.HPO_DEFAULT_TRIAL  # a new study runs the defaults first (SearchSpace.default_params)


def make_objective(config: HpoConfig, space: SearchSpace, train_pairs, val_pairs, device):
    def objective(trial: optuna.Trial) -> float:
        sampled = space.sample(trial)
        params = TrainParams(backbone=config.backbone, weights=config.weights, weights_file=config.weights_file,
                             image_size=config.image_size, epochs=config.epochs, optimizer=config.optimizer,
                             workers=config.workers, warmup_iters=config.warmup_iters, seed=config.seed,
                             batch_size=sampled.get("batch_size", space.batch_sizes[0]),
                             lr=sampled["lr"], momentum=sampled["momentum"], weight_decay=sampled["weight_decay"],
                             trainable_layers=sampled["trainable_layers"])
        trainer = Trainer(params, train_pairs, device, val_pairs=val_pairs, progress=False,
                          label_map=config.label_map)
        value = 0.0
        for epoch in range(config.epochs):
            try:
                row = trainer.run_epoch(validate_map=False, validate_loss=False)
            except NonFiniteLossError as error:
                # Divergence is a (bad) result of these hyperparameters, not a crash of the study.
                trial.set_user_attr("diverged", str(error))
                trial.report(0.0, epoch)
                raise optuna.TrialPruned(f"diverged at epoch {epoch + 1}") from None
            predictions = trainer.validation_predictions()
            summary = coco_map(*predictions)
            compliance = compliance_error(*predictions, score_threshold=config.score_threshold)
            value = fitness(summary, config.objective)
            trial.set_user_attr(f"epoch_{epoch + 1}", {"map": summary["map"], "map_50": summary["map_50"],
                                                       "compliance_error_points": compliance["error_points"],
                                                       "train_loss": row.train_loss})
            trial.report(value, epoch)
            log.info("trial %d epoch %d/%d: %s %.4f (mAP %.4f, mAP@0.5 %.4f, compliance error %s points), "
                     "loss %.4f", trial.number, epoch + 1, config.epochs, config.objective, value, summary["map"],
                     summary["map_50"], compliance["error_points"], row.train_loss)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch + 1} with {value:.4f}")
        trial.set_user_attr("map", summary["map"])
        trial.set_user_attr("map_50", summary["map_50"])
        trial.set_user_attr("compliance_error_points", compliance["error_points"])
        trial.set_user_attr("per_image_mae_points", compliance["per_image_mae_points"])
        return value

    return objective


def run_study(config: HpoConfig, space: SearchSpace, train_images, train_annotations, val_images, val_annotations,
              journal, n_trials: int, device, study_name: str | None = None, worker_index: int = 0,
              num_workers: int = D.HPO_NUM_WORKERS, timeout: float | None = None,
              pruner_startup_trials: int = D.HPO_PRUNER_STARTUP_TRIALS,
              pruner_warmup_epochs: int = D.HPO_PRUNER_WARMUP_EPOCHS, tensorboard_dir=None,
              inputs_seen: dict | None = None, skipped_listed_in=None) -> dict:
    """Run (or continue) this worker's study until it holds *n_trials* finished trials; returns best.json's dict.

    *tensorboard_dir*: write each finished trial's objective and parameters there as TensorBoard events
    (utils.detection.tensorboard_log.HpoBoard). *inputs_seen*: a dict filled with the training and validation
    files' sha256 by path, for the job's run record. *skipped_listed_in*: the output listing every skipped input
    (best.json), named after the first few printed (utils.cli.print_skipped)."""
    if config.objective not in D.HPO_OBJECTIVES:
        raise HpoError(f"unknown objective {config.objective!r}: use {' or '.join(D.HPO_OBJECTIVES)}")
    if n_trials < 1:
        raise HpoError("--n-trials must be at least 1")
    if config.epochs < 1:
        raise HpoError("--epochs must be at least 1")
    worker_space = space.for_worker(worker_index, num_workers)
    study_name = study_name or f"mask-hpo-worker{worker_index}of{num_workers}"
    study, storage = open_study(journal, study_name, seed=worker_seed(config.seed, worker_index),
                                pruner_startup_trials=pruner_startup_trials,
                                pruner_warmup_epochs=pruner_warmup_epochs)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        train_pairs, train_skipped = stack.enter_context(open_pairs(train_images, train_annotations))
        # at the trials' training sizes (make_objective: config.image_size, the default --multiscale); the
        # validation images only run through inference, which gives a thin one no detections
        train_pairs, thin = too_thin_to_train(train_pairs, TrainParams(image_size=config.image_size))
        val_pairs, val_skipped = stack.enter_context(open_pairs(val_images, val_annotations))
        skipped = train_skipped + thin + val_skipped
        print_skipped(skipped, skipped_listed_in if train_pairs and val_pairs else None, reason_key="problem")
        problems = object_problems(train_pairs + val_pairs, config.label_map)
        if problems:
            log.warning(object_problems_line(problems))
        if not train_pairs:
            raise HpoError(f"{train_images}: no usable training pairs")
        if not val_pairs:
            raise HpoError(f"{val_images}: no usable validation pairs")
        data_sha256, files_sha256 = pairs_sha256(train_pairs, val_pairs)
        if inputs_seen is not None:  # every file's sha256 by path, for the job's run record
            inputs_seen.update(files_sha256)
        check_study_search(study, journal, config, worker_space, data_sha256)  # before the journal changes
        enqueue_default_trial(study, config, space, worker_index, num_workers)
        recovered = recover_stale_trials(study, storage)
        callbacks = []
        if tensorboard_dir:
            from .tensorboard_log import HpoBoard

            board = HpoBoard(tensorboard_dir, config.objective)
            stack.callback(board.close)
            replayed = board.replay(study)  # a fresh folder (a pool job's retry), or a trial a kill left out
            if replayed:
                log.info("TensorBoard: wrote the %d finished trial(s) of the journal that %s lacked", replayed,
                         tensorboard_dir)
            callbacks.append(board)
        finished = trial_counts(study)["finished"]
        remaining = n_trials - finished
        log.info("study %s in %s: %d finished trial(s), %d to run (worker %d of %d, lr %.2e..%.2e)",
                 study_name, journal, finished, max(remaining, 0), worker_index, num_workers,
                 worker_space.lr_min, worker_space.lr_max)
        if remaining > 0:
            objective = make_objective(config, worker_space, train_pairs, val_pairs, device)
            try:
                with _quiet_about_stops():
                    study.optimize(objective, n_trials=remaining, timeout=timeout, gc_after_trial=True,
                                   callbacks=callbacks)
            except StopRequested:
                # Optuna has marked the interrupted trial failed; the retry runs its parameters again.
                interrupted = study.get_trials(deepcopy=False)[-1]
                requeue(study, interrupted, "was interrupted by SIGTERM")
                done = trial_counts(study)["finished"]
                raise StopRequested(f"SIGTERM received; trial {interrupted.number} abandoned (its parameters run "
                                    f"again on the retry); the journal holds {done} finished trial(s)") from None
    counts = trial_counts(study)
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    best = max(complete, key=lambda t: t.value) if complete else None
    return {
        "study_name": study_name,
        "journal": str(journal),
        "worker_index": worker_index,
        "num_workers": num_workers,
        "objective": config.objective,
        "objective_description": D.HPO_OBJECTIVES[config.objective],
        "best_params": dict(best.params) if best else None,
        "best_value": best.value if best else None,
        "best_trial": best.number if best else None,
        "best_metrics": ({key: best.user_attrs.get(key) for key in ("map", "map_50", "compliance_error_points",
                                                                     "per_image_mae_points")}
                         if best else None),
        "fixed_params": {"optimizer": config.optimizer, "batch_size": space.batch_sizes[0],
                         "epochs": config.epochs, "image_size": config.image_size, "backbone": config.backbone,
                         "warmup_iters": config.warmup_iters},
        "n_trials_requested": n_trials,
        "trial_counts": counts,
        "trials_resumed": finished,  # the finished trials the journal held when this run began
        "inputs_sha256": data_sha256,
        "requeued_stale_trials": recovered,
        "search_space": worker_space.describe(),
        "full_search_space": space.describe(),
        "num_train_images": len(train_pairs),
        "num_val_images": len(val_pairs),
        "skipped_inputs": skipped,
        "object_problems": problems,
        "seconds_this_run": round(time.monotonic() - started, 1),
        "trials": trial_records(study),
    }
