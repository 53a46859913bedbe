"""Training: hyperparameters, the training loader and the Trainer.

bin/train.py runs the job over these through utils.detection.training_run (whole runs, resumable from a
checkpoint; the metrics CSV and loss plot); the HPO objective runs one short Trainer per trial, reporting
after every epoch. The schedule is a utils.detection.training_plan.TrainingPlan.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, replace

import torch

from .. import defaults as D
from ..classes import NO_LABEL_MAP, LabelMap
from .checkpoint import load_checkpoint, restore_checkpoint, save_checkpoint, seed_everything
from .engine import evaluate_loss, run_inference, train_steps
from .optim import build_optimizer, build_scheduler, make_grad_scaler, set_schedule_length
from .params import TrainParams, TrainingDataError, background_iou
from .model import build_model, freeze_backbone, set_trainable_layers
from .recipe import (RecordedPlan, TimeBudget, build_ema, make_loader, multiscale_sizes, set_box_head_training,
                     set_roi_batch_size, set_train_sizes)
from ..stop import check_stop
from .stages import Stage
from .training_plan import TrainingPlan, make_plan

log = logging.getLogger(__name__)


def auto_workers(device) -> int:
    """DataLoader processes for training: none on a CPU, a few on a GPU.

    On a CPU the training step takes ~0.5 s per 512 px image and decoding plus XML
    parsing under 1% of that (bench/train_step.py), so worker processes only take
    cores from the model's threads: on 2 cores, 2 workers cost ~19% of the speed.
    On a GPU the step is fast and decoding must overlap it.
    """
    if torch.device(device).type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(D.LOADER_WORKERS_GPU_MAX, cpus // 2))


# ----------------------------------------------------------------------------- the loop

@dataclass
class EpochRow:
    epoch: int
    lr: float
    train_loss: float
    loss_classifier: float
    loss_box_reg: float
    loss_objectness: float
    loss_rpn_box_reg: float
    images_per_s: float
    seconds: float
    backbone_frozen: bool
    val_loss: float | None = None
    val_map: float | None = None
    val_map_50: float | None = None
    stage: int = 1  # 1-based stage of a staged run (--stages); 1 for a one-stage run
    val_fitness: float | None = None
    step: int | None = None  # training steps taken by the epoch's end: the step its TensorBoard events are at


@dataclass(frozen=True)
class TrainingRecord:
    """What a run trained: its plan (a budget's fitted one), the budget plan --budget-plan replays, the RoI
    batch size the box head sampled, the per-epoch history and which epoch's weights it kept."""

    plan: TrainingPlan
    budget_plan: tuple[int | None, int] | None
    roi_batch_size: int
    history: tuple[dict, ...]
    kept: dict


class Trainer:
    """Model, optimizer and schedule for one run; ``run_epoch`` trains one epoch and can be checkpointed.

    *params* (frozen) are read, never written; *plan* (training_plan.make_plan of
    them when not given) is the schedule. label_map: how the annotations' object names become classes.
    The recipe's levers (utils.detection.recipe) are set by *params*: photometric augmentation,
    multi-scale training, repeat-factor sampling and weight EMA. A time budget, or a recorded budget plan,
    fits the plan during the first epoch: the Trainer then follows the new plan the old one returns.

    Staged training (``plan.stages``): each stage trains its own trainable layers with a new optimizer
    over them, at its own lr, under a fresh warm-up + cosine schedule as long as the stage; the checkpoint
    records the stage its optimizer belongs to, so a resumed run continues in the right stage and epoch.
    ``board`` (a tensorboard_log.TrainBoard, set by the caller) receives the steps and epochs when set.
    """

    def __init__(self, params: TrainParams, train_pairs, device, val_pairs=None, progress: bool = True,
                 label_map: LabelMap = NO_LABEL_MAP, plan: TrainingPlan | None = None, keep: str = "last"):
        if keep not in ("best", "last"):
            raise ValueError(f"keep must be 'best' or 'last', got {keep!r}")
        self.settings = params  # frozen: never written, here or by the caller
        self.keep = keep
        # keep="best": the epoch of the highest validation fitness so far, {epoch, fitness, model (CPU state)},
        # chosen among the epochs from best_since on (later than 1 when resumed from a checkpoint without one)
        self.best: dict | None = None
        self.best_since = 1
        self.plan = plan if plan is not None else make_plan(params)
        self.label_map = label_map
        self.device = device
        self.progress = progress
        seed_everything(params.seed)
        self.model = build_model(params.backbone, weights=params.weights, weights_file=params.weights_file,
                                 trainable_layers=params.trainable_layers, image_size=params.image_size)
        set_train_sizes(self.model, multiscale_sizes(params.image_size, params.multiscale))
        # recorded as trained: None (the architecture's own) becomes its number
        self.roi_batch_size = set_roi_batch_size(self.model, params.roi_batch_size)
        set_box_head_training(self.model, params.box_loss, params.roi_fg_iou, params.roi_bg_iou)
        self.model.to(device)
        self.ema = build_ema(self.model, params.ema_decay)
        self.generator = torch.Generator()
        pin = device.type == "cuda"
        workers = params.workers if params.workers >= 0 else auto_workers(device)
        self.train_pairs = train_pairs
        self._make_train_loader(workers)
        self.val_loader = (make_loader(val_pairs, params.batch_size, workers, shuffle=False, pin_memory=pin,
                                       label_map=label_map) if val_pairs else None)
        self.steps_per_epoch = len(self.train_loader)
        self.stage_index: int | None = None  # a staged run's running stage
        if self.plan.staged:
            self._enter_stage(0)
        else:
            self.optimizer = build_optimizer(self.model, params.optimizer, params.lr, params.momentum,
                                             params.weight_decay)
            # The cosine starts as long as the epochs and is then cut to max_steps, as a budget's plan cuts
            # it: the first step's rate is that of the whole epochs' schedule (what earlier runs trained).
            self.scheduler = build_scheduler(self.optimizer, total_iters=self.plan.epochs * self.steps_per_epoch,
                                             warmup_iters=params.warmup_iters, schedule=params.lr_schedule)
            if self.plan.max_steps is not None:
                self._follow(self.plan.with_steps(self.plan.max_steps, self.steps_per_epoch))
        self.board = None
        self.scaler = make_grad_scaler(device, params.amp)
        self.completed_epochs = 0
        # The steps taken, the global step of TensorBoard's events: repeat-factor sampling draws a rare class's
        # images once or twice, so an epoch may hold a batch more or fewer than steps_per_epoch (len(loader)).
        self.steps_taken = 0
        self.history: list[dict] = []
        # The budget's clock (or the recorded budget plan replayed at the same points) while the plan is fitting.
        self._first_fit: int | None = None
        self._planner = None
        if self.plan.budget_plan is not None and self.plan.fitting:
            self._planner = RecordedPlan(list(self.plan.budget_plan), self.steps_per_epoch)
        elif self.plan.fitting:
            val_batches = len(self.val_loader) if self.val_loader is not None else 0
            self._planner = TimeBudget(self.plan.time_budget, self.steps_per_epoch, val_batches,
                                       validations_per_epoch=2 if val_batches else 0)

    @property
    def eval_model(self):
        """What validation, the threshold choice and the model file use: the EMA weights when kept."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def params(self) -> TrainParams:
        """The parameters as trained, for records: the plan's epochs, stages, steps and budget plan and the
        RoI batch size the model samples in place of the requested ones."""
        return replace(self.settings, **self.plan.as_record(), roi_batch_size=self.roi_batch_size)

    @property
    def budget(self):
        """The time budget (or recorded budget plan) still fitting the plan; None once the plan is fixed."""
        return self._planner if self.plan.fitting else None

    @property
    def stages(self) -> tuple[Stage, ...] | None:
        return self.plan.stages

    @property
    def requested_stages(self) -> tuple[Stage, ...] | None:
        return self.plan.requested_stages

    def record(self) -> TrainingRecord:
        return TrainingRecord(self.plan, self.plan.budget_plan, self.roi_batch_size, tuple(self.history),
                              self.kept_weights())

    def kept_weights(self) -> dict:
        """Which epoch's weights the model file keeps (:meth:`load_kept_weights` loads them): with keep="best" and
        a validated run, the epoch of the highest validation fitness; else the last."""
        last = self.history[-1] if self.history else {}
        kept = {"rule": self.keep, "epoch": self.completed_epochs, "val_fitness": last.get("val_fitness"),
                "last_epoch": self.completed_epochs, "last_val_fitness": last.get("val_fitness")}
        if self.keep == "best" and self.best is None:
            unmeasured = ("the validation images hold no labelled face" if self.val_loader is not None else
                          "no held-out validation images")
            why = (f"no validation fitness was measured ({unmeasured})" if self.best_since == 1 else
                   "resumed from a checkpoint that holds no best epoch (written with --keep last), with no epoch "
                   "trained since")
            return {**kept, "rule": "last", "note": f"{why}: the last epoch's weights"}
        if self.keep == "best":
            kept.update(epoch=self.best["epoch"], val_fitness=self.best["fitness"], chosen_from_epoch=self.best_since)
        return kept

    def load_kept_weights(self) -> dict:
        """After training: load the kept epoch's weights into eval_model (a no-op for the last); returns
        :meth:`kept_weights`. The checkpoint keeps the last epoch's, so a resumed run trains on from there."""
        kept = self.kept_weights()
        if kept["epoch"] != self.completed_epochs:
            self.eval_model.load_state_dict(self.best["model"])
        return kept

    # -- the plan ----------------------------------------------------------------------------
    def _follow(self, plan: TrainingPlan) -> None:
        """Train to *plan* from now on: the running schedule takes its length (the steps already run keep
        their rates, and so does the next one, whose rate is already set)."""
        self.plan = plan
        set_schedule_length(self.scheduler, plan.schedule_steps(self.stage_index or 0, self.steps_per_epoch))

    def set_plan(self, steps: int) -> None:
        """Follow this plan fitted to *steps* training steps in all (what the time budget returns)."""
        self._follow(self.plan.with_steps(steps, self.steps_per_epoch))

    def stage_layers(self, stage: Stage) -> int:
        return self.settings.trainable_layers if stage.trainable_layers is None else stage.trainable_layers

    def _enter_stage(self, index: int) -> None:
        """Stage *index* begins: its trainable layers, a new optimizer over them at its lr, a fresh schedule."""
        params, stage = self.settings, self.plan.stages[index]
        set_trainable_layers(self.model, self.stage_layers(stage))
        lr = params.lr if stage.lr is None else stage.lr
        self.optimizer = build_optimizer(self.model, params.optimizer, lr, params.momentum, params.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, total_iters=self.plan.schedule_steps(index,
                                                                                             self.steps_per_epoch),
                                         warmup_iters=params.warmup_iters, schedule=params.lr_schedule)
        self.stage_index = index

    def describe_stages(self) -> str:
        """'stage 1 (head): 3 epochs, lr 0.02, 0 trainable layers; stage 2: ...' for the log."""
        return "; ".join(f"{stage.label(number)}: {stage.epochs} epoch(s), "
                         f"lr {self.settings.lr if stage.lr is None else stage.lr:g}, "
                         f"{self.stage_layers(stage)} trainable layer(s)"
                         for number, stage in enumerate(self.plan.stages, start=1))

    def steps_done(self) -> int:
        """Training steps the finished epochs hold (the global step TensorBoard events are logged at)."""
        return self.plan.steps_done(self.completed_epochs, self.steps_per_epoch)

    def steps_left_in_epoch(self) -> int | None:
        """The steps the current epoch may take under max_steps (None: the whole epoch)."""
        return self.plan.steps_left_in_epoch(self.completed_epochs, self.steps_per_epoch)

    @property
    def finished(self) -> bool:
        return self.completed_epochs >= self.plan.epochs

    # -- checkpoints -------------------------------------------------------------------------
    def _make_train_loader(self, workers: int) -> None:
        params = self.settings
        self.train_workers = workers  # recorded in the checkpoint: the augmentation draws follow the count
        self.train_loader = make_loader(self.train_pairs, params.batch_size, workers, shuffle=True,
                                        hflip=params.hflip, generator=self.generator,
                                        pin_memory=self.device.type == "cuda", label_map=self.label_map,
                                        photometric=params.photometric, repeat_threshold=params.repeat_threshold)

    def resume(self, checkpoint_path, inputs_sha256: str | None = None, run_args: dict | None = None) -> int:
        """Continue the run *checkpoint_path* holds; returns the epochs it finished. Refused (TrainingDataError)
        when it was written for other work: other data (*inputs_sha256*, the hash of this run's input files,
        against the one the checkpoint recorded; *run_args*, such as val_mode, against the job arguments it
        recorded; the label map), other pretrained weights (--weights), another recipe or another plan (epochs,
        steps, freeze epochs, time budget: a finished 3-epoch run resumed with --epochs 5 would train on at the
        old schedule's last learning rate)."""
        payload = load_checkpoint(checkpoint_path)
        written_for = payload.get("args", {}).get("inputs_sha256")
        if inputs_sha256 is not None and written_for is not None and written_for != inputs_sha256:
            raise TrainingDataError(f"{checkpoint_path}: written for other training data (inputs sha256 "
                                    f"{written_for[:12]}…, this run's {inputs_sha256[:12]}…); delete the checkpoint "
                                    "or train on the data it was written for")
        # the object names' classes: the same files read with another --label-map are other training data
        run_args = {**(run_args or {}), "label_map": self.label_map.as_dict()}
        for key, value in run_args.items():
            written = payload.get("args", {}).get(key)
            if written is not None and written != value:
                raise TrainingDataError(f"{checkpoint_path}: written with {key}={written!r}, this run has {value!r}; "
                                        "delete the checkpoint or match the flags")
        saved = payload.get("args", {}).get("params", {})
        # checkpoints from before the box head's levers existed trained with their defaults
        defaults = TrainParams()
        saved = {"box_loss": defaults.box_loss, "roi_fg_iou": defaults.roi_fg_iou, "roi_bg_iou": None, **saved}
        keys = ("backbone", "weights", "image_size", "optimizer", "batch_size", "ema_decay", "roi_batch_size",
                "box_loss", "roi_fg_iou", "roi_bg_iou", "lr", "momentum", "weight_decay", "lr_schedule",
                "warmup_iters", "clip_grad", "trainable_layers", "hflip", "photometric", "multiscale",
                "repeat_threshold", "seed", "workers")  # workers as asked: -1's count differs between a pool's nodes
        if saved.get("time_budget") is None and self.params.time_budget is None and not self.plan.staged:
            keys += ("max_steps", "freeze_backbone_epochs")  # a budget run's are fitted, not asked for
            done, planned = int(payload.get("epoch", 0)), saved.get("epochs")
            if planned is not None and not done <= self.params.epochs <= planned:
                # fewer epochs stop the run early; more would train on at the end of the schedule fitted to it
                raise TrainingDataError(f"{checkpoint_path}: written for {planned} epochs ({done} done), this run "
                                        f"asks for {self.params.epochs}; --epochs may stop it early (from {done} to "
                                        f"{planned}); delete the checkpoint to train another length")
        keys += ("time_budget",)
        ours = {key: getattr(self.params, key) for key in keys}

        def trained_as(values, key):  # the background bound as trained: None is the face bound (no band)
            return background_iou(values["roi_fg_iou"], values[key]) if key == "roi_bg_iou" else values.get(key)

        for key in keys:
            if key in saved and trained_as(saved, key) != trained_as(ours, key):
                raise TrainingDataError(f"{checkpoint_path}: written with {key}={saved[key]!r}, this run has "
                                        f"{ours[key]!r}; delete the checkpoint or match the flags")
        asked = self.plan.as_record()["budget_plan"]
        if asked is not None and saved.get("budget_plan") != asked:
            raise TrainingDataError(f"{checkpoint_path}: written with budget_plan={saved.get('budget_plan')!r}, this "
                                    f"run has {asked!r}; delete the checkpoint or match --budget-plan")
        extra = payload.get("extra") or {}
        started_with = extra.get("train_workers")
        if self.settings.workers < 0 and isinstance(started_with, int) and 0 <= started_with != self.train_workers:
            # -1 resolves per machine (a pool's retry lands on another node); each worker process draws the flips
            # and colours of its own images, so the run goes on with the count it started with
            log.info("%s: resuming with the %d loader worker(s) the run started with (--workers -1 gives %d here)",
                     checkpoint_path, started_with, self.train_workers)
            self._make_train_loader(started_with)
        asked = self.plan.requested_record()
        if extra.get("stages_requested") != asked:
            raise TrainingDataError(f"{checkpoint_path}: written with stages={extra.get('stages_requested')!r}, this "
                                    f"run has {asked!r}; delete the checkpoint or match --stages")
        # A budget run's plan as the interrupted run fitted it (the scheduler's length comes with its state).
        self.plan = self.plan.resumed(saved, self.steps_per_epoch, str(checkpoint_path))
        if self.plan.staged:
            self._enter_stage(int(extra["stage_index"]))  # the optimizer and schedule in the file are this stage's
        self.completed_epochs = restore_checkpoint(payload, self.model, self.optimizer, self.scheduler,
                                                   self.scaler, path=checkpoint_path)
        if self.ema is not None and extra.get("ema") is not None:
            self.ema.load_state_dict(extra["ema"])
        self.history = list(payload.get("history", []))
        # a checkpoint from before steps_taken: its events were numbered by the plan
        self.steps_taken = int(extra.get("steps_taken", self.steps_done()))
        if self.keep == "best":
            self.best = extra.get("best")
            if self.best is None and self.completed_epochs:
                self.best_since = self.completed_epochs + 1
                log.warning("%s holds no best epoch (written with --keep last): the best is chosen among epochs %d "
                            "on", checkpoint_path, self.best_since)
        return self.completed_epochs

    def checkpoint(self, path, args: dict) -> None:
        args = {**args, "params": self.params.to_dict(), "label_map": self.label_map.as_dict()}  # as trained
        extra = {"ema": self.ema.state_dict() if self.ema is not None else None, "stage_index": self.stage_index,
                 "stages_requested": self.plan.requested_record(), "best": self.best,
                 "train_workers": self.train_workers, "steps_taken": self.steps_taken}
        save_checkpoint(path, self.model, self.optimizer, self.scheduler, self.completed_epochs, args,
                        scaler=self.scaler, history=self.history, extra=extra)

    # -- the loop ----------------------------------------------------------------------------
    def _after_step(self, iteration: int, values: dict) -> None:
        self.steps_taken += 1
        if self.board is not None:
            self.board.log_step(self.steps_taken, values)
        check_stop(self._abandoned())
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        if self.budget is not None and self.completed_epochs == 0:
            steps = self.budget.fit_after_step(iteration)
            if steps is not None:
                self._first_fit = steps
                self.set_plan(steps)

    def _abandoned(self) -> str:
        done = self.completed_epochs
        return (f"epoch {done + 1} abandoned; the checkpoint holds {done} finished epoch(s)" if done else
                "epoch 1 abandoned; no checkpoint yet, a retry starts afresh")

    def run_epoch(self, validate_map: bool = False, validate_loss: bool = True) -> EpochRow:
        epoch = self.completed_epochs
        check_stop(self._abandoned())
        stage_number = 1
        if self.plan.staged:
            index = self.plan.stage_at(epoch)
            if index != self.stage_index:
                self._enter_stage(index)
                log.info("%s begins at epoch %d", self.plan.stages[index].label(index + 1), epoch + 1)
            stage_number = index + 1
            frozen = self.stage_layers(self.plan.stages[index]) == 0
        else:
            frozen = epoch < self.plan.freeze_backbone_epochs
            if frozen:
                freeze_backbone(self.model)
            else:
                set_trainable_layers(self.model, self.settings.trainable_layers)
        # The shuffle order and augmentation seeds depend only on (seed, epoch): a resumed run sees the same batches.
        self.generator.manual_seed(self.settings.seed * 100_003 + epoch)
        steps = train_steps(self.model, self.optimizer, self.train_loader, self.device, epoch,
                            scheduler=self.scheduler, scaler=self.scaler, clip_grad=self.settings.clip_grad,
                            amp=self.settings.amp, progress=self.progress)
        with contextlib.closing(steps):  # also when a step's work raises (a SIGTERM stop)
            for iteration, (values, totals) in enumerate(steps):
                stats = totals  # filled in when the loop is closed
                self._after_step(iteration, values)
                # max_steps, or a time budget's plan (which may change during epoch 1), may end this epoch here
                left = self.steps_left_in_epoch()
                if left is not None and iteration + 1 >= left:
                    break
        row = EpochRow(epoch=epoch + 1, lr=stats["lr"], train_loss=stats["loss"],
                       loss_classifier=stats.get("loss_classifier", math.nan),
                       loss_box_reg=stats.get("loss_box_reg", math.nan),
                       loss_objectness=stats.get("loss_objectness", math.nan),
                       loss_rpn_box_reg=stats.get("loss_rpn_box_reg", math.nan),
                       images_per_s=stats["images_per_s"], seconds=stats["seconds"], backbone_frozen=frozen,
                       stage=stage_number, step=self.steps_taken)
        validation_started = time.perf_counter()
        if self.val_loader is not None and validate_loss:
            row.val_loss = evaluate_loss(self.eval_model, self.val_loader, self.device).get("loss")
        predictions = None
        if self.val_loader is not None and validate_map:
            from .metrics import coco_map, fitness  # torchmetrics: imported when a run validates its mAP

            predictions = self.validation_predictions()
            summary = coco_map(*predictions)
            row.val_map, row.val_map_50, row.val_fitness = summary["map"], summary["map_50"], fitness(summary)
            if self.keep == "best" and row.val_fitness is not None and (
                    self.best is None or row.val_fitness > self.best["fitness"]):
                self.best = {"epoch": epoch + 1, "fitness": row.val_fitness,
                             "model": {key: value.detach().to("cpu", copy=True)
                                       for key, value in self.eval_model.state_dict().items()}}
        validation_s = time.perf_counter() - validation_started
        self.completed_epochs = epoch + 1
        if self.board is not None:
            self._log_epoch(row, predictions)
        if self.budget is not None and self.completed_epochs == 1:
            final = self.budget.fit_after_epoch(stats["steps"], stats["seconds"], validation_s)
            self._follow(self.plan.fitted(self._first_fit, final, self.steps_per_epoch))
        self.history.append(asdict(row))
        return row

    def _log_epoch(self, row: EpochRow, predictions: tuple[list[dict], list[dict]] | None) -> None:
        """The epoch's row, validation F1 at the board's score threshold and a few annotated validation images."""
        from .compliance import detection_f1

        values = asdict(row)
        if predictions is not None:
            values["val_f1"] = detection_f1(*predictions, score_threshold=self.board.score_threshold)["f1"]
        step = self.steps_taken
        self.board.log_epoch(step, values)
        if predictions is not None:
            self.board.log_validation_images(step, self.val_loader.dataset, *predictions)

    def validation_predictions(self, tta: bool = False, stop: str | None = None) -> tuple[list[dict], list[dict]]:
        """(predictions made in eval mode, with flip TTA when asked, targets) over the validation loader; with *stop*
        (what a stop abandons) a SIGTERM stops it at the next batch (an epoch's validation runs to its end)."""
        return run_inference(self.eval_model, self.val_loader, self.device, tta=tta, stop=stop)
