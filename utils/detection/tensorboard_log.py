"""TensorBoard event files of train and hpo (``--tensorboard-dir``), and their .tar for staging out.

train (TrainBoard): the losses and learning rate every few steps, per epoch the mean losses, the
validation loss, mAP, mAP@0.5 and F1 at the default score threshold, the stage, and up to
TENSORBOARD_IMAGES validation images with their predicted boxes (ground truth in white).
Every event's step is the global training step, the epoch-level ones at the epoch's last step,
so one ``purge_step`` on resume (one past the steps the checkpoint holds) drops whatever an
interrupted try logged past its checkpoint and a resumed run appends without duplicate steps. A resumed run
whose event folder is empty (a pool job starts in a fresh folder) writes the epoch rows of the
checkpoint's history first, so the epoch curves still start at epoch 1.

hpo (HpoBoard, an Optuna callback): per finished trial (complete or pruned) the objective at the
trial's number, each parameter as a scalar, the per-epoch objective of the trial, and add_hparams
(the HPARAMS tab). A trial number is never reused (an interrupted trial is requeued under a new
number), so reruns cannot duplicate steps; a rerun first logs the finished trials the folder lacks (all in
an empty folder; one whose job was killed between the journal's write and the events' otherwise).

A Pegasus job declares fixed output names, and event file names hold the host and time, so a job
packs its folder into one .tar (``--tensorboard-tar``) whose members are ``tensorboard/<folder
name>/...``: unpacked into the output folder they give ``tensorboard/train``, ``tensorboard/hpo_0``,
... (the local executor does this; ``tensorboard --logdir RUN_DIR/outputs/tensorboard``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from .. import defaults as D
from ..classes import CLASS_COLOURS, NAME_OF
from ..data.pairs import pack_folder
from ..errors import InputError
from ..naming import TENSORBOARD_FOLDER

log = logging.getLogger(__name__)

ARCHIVE_ROOT = TENSORBOARD_FOLDER  # the top folder inside every events .tar (the jobs' folder of events)
EVENT_FILE_GLOB = "events.out.tfevents.*"


class TensorBoardError(InputError):
    """A --tensorboard-dir / --tensorboard-tar that cannot be used."""


def has_events(log_dir) -> bool:
    log_dir = Path(log_dir)
    return log_dir.is_dir() and any(log_dir.rglob(EVENT_FILE_GLOB))


def _summary_writer(log_dir, purge_step: int | None = None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:  # tensorboard is in requirements.txt; a bare environment may lack it
        raise TensorBoardError(f"--tensorboard-dir {log_dir}: the tensorboard package is not installed "
                               f"({error}); pip install -r requirements.txt") from None
    try:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TensorBoardError(f"--tensorboard-dir {log_dir}: cannot create the folder ({error})") from None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def annotated_image(image, prediction: dict, target: dict | None, score_threshold: float):
    """uint8 CxHxW of *image* (float [0, 1]) with the ground truth (white, thin) and the predicted boxes at or
    above *score_threshold* (class colours, 'class score')."""
    import torch
    from torchvision.utils import draw_bounding_boxes

    canvas = (image.clamp(0, 1) * 255).to(torch.uint8)
    if target is not None and len(target["boxes"]):
        canvas = draw_bounding_boxes(canvas, target["boxes"].as_subclass(torch.Tensor).float(), colors="white",
                                     width=1)
    keep = prediction["scores"] >= score_threshold
    boxes, labels, scores = prediction["boxes"][keep], prediction["labels"][keep], prediction["scores"][keep]
    if len(boxes):
        names = [NAME_OF.get(int(label), str(int(label))) for label in labels]
        canvas = draw_bounding_boxes(canvas, boxes.float(), labels=[f"{n} {s:.2f}" for n, s in zip(names, scores)],
                                     colors=[CLASS_COLOURS.get(n, (255, 255, 255)) for n in names], width=2)
    return canvas


class TrainBoard:
    """The train job's events (see the module docstring); ``every``: steps per logged step scalar."""

    def __init__(self, log_dir, purge_step: int | None = None, every: int = D.TENSORBOARD_EVERY,
                 images: int = D.TENSORBOARD_IMAGES, score_threshold: float = D.SCORE_THRESHOLD):
        if every < 1:
            raise TensorBoardError(f"--tensorboard-every must be at least 1, got {every}")
        self.log_dir = Path(log_dir)
        self.was_empty = not has_events(self.log_dir)
        self.writer = _summary_writer(self.log_dir, purge_step=purge_step)
        self.every = every
        self.images = max(0, min(images, D.TENSORBOARD_IMAGES))
        self.score_threshold = score_threshold
        self._window: dict[str, list[float]] = {}
        self._window_step = 0

    def log_step(self, step: int, values: dict) -> None:
        """One training step's losses and lr; every ``every`` steps (and at an epoch's end) their means
        since the last write."""
        for key, value in values.items():
            self._window.setdefault(key, []).append(float(value))
        self._window_step = step
        if step % self.every == 0:
            self.flush_steps()

    def flush_steps(self) -> None:
        for key, values in self._window.items():
            if values:
                tag = "train/lr" if key == "lr" else f"train/step_{key}"
                self.writer.add_scalar(tag, sum(values) / len(values), self._window_step)
        self._window = {}

    def log_epoch(self, step: int, row: dict) -> None:
        """An epoch row (an EpochRow as a dict) at the epoch's last global *step*."""
        self.flush_steps()  # the epoch's last steps, when they do not fill a window
        scalars = {"train/epoch_loss": row.get("train_loss"), "train/epoch": row.get("epoch"),
                   "train/stage": row.get("stage"), "train/images_per_s": row.get("images_per_s"),
                   "train/epoch_lr": row.get("lr"), "val/loss": row.get("val_loss"), "val/map": row.get("val_map"),
                   "val/map_50": row.get("val_map_50"), "val/f1": row.get("val_f1")}
        for key in ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"):
            scalars[f"train/epoch_{key}"] = row.get(key)
        for tag, value in scalars.items():
            if _finite(value):
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def log_validation_images(self, step: int, dataset, predictions: list[dict], targets: list[dict]) -> None:
        """The first ``images`` validation images (the loader's order) with their predicted boxes."""
        for index in range(min(self.images, len(predictions))):
            image, _ = dataset[index]
            picture = annotated_image(image, predictions[index], targets[index], self.score_threshold)
            self.writer.add_image(f"val/image_{index}", picture, step, dataformats="CHW")
        self.writer.flush()

    def replay_history(self, history: list[dict], epoch_step) -> int:
        """Write the epoch rows of a checkpoint's *history* (a resumed run in an empty folder), each at the step
        the run logged it at: the row's own, else (a row from before rows held it) what *epoch_step* (epochs
        done -> training steps) gives; returns how many."""
        for row in history:
            self.log_epoch(int(row["step"]) if row.get("step") is not None else epoch_step(int(row["epoch"])), row)
        return len(history)

    def close(self) -> None:
        self.writer.close()


class HpoBoard:
    """An Optuna callback writing each finished trial (see the module docstring)."""

    def __init__(self, log_dir, objective: str):
        self.log_dir = Path(log_dir)
        self.writer = _summary_writer(self.log_dir)
        self.objective = objective

    def __call__(self, study, trial) -> bool:
        """Write *trial* if it finished with a value; returns whether it did. Its HPARAMS run
        (``trial_<number>``) is written last, so a trial that has one was written whole (:meth:`logged`)."""
        from optuna.trial import TrialState

        if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            return False
        curve = sorted(trial.intermediate_values.items())
        value = trial.value if trial.value is not None else (curve[-1][1] if curve else None)
        if value is None:
            return False  # pruned before its first epoch: no value to show
        step = trial.number
        self.writer.add_scalar(f"hpo/{self.objective}", value, step)
        for name, parameter in trial.params.items():
            if isinstance(parameter, (int, float)) and not isinstance(parameter, bool):
                self.writer.add_scalar(f"hpo_params/{name}", parameter, step)
        for epoch, epoch_value in curve:
            self.writer.add_scalar(f"trials/trial_{trial.number:04d}_{self.objective}", epoch_value, epoch + 1)
        self.writer.flush()
        metrics = {f"hparam/{self.objective}": value}
        for key in ("map", "map_50", "compliance_error_points"):
            if _finite(trial.user_attrs.get(key)):
                metrics[f"hparam/{key}"] = trial.user_attrs[key]
        hparams = {**trial.params, "state": trial.state.name.lower()}
        self.writer.add_hparams(hparams, metrics, run_name=self._run_name(trial.number), global_step=step)
        return True

    @staticmethod
    def _run_name(number: int) -> str:
        return f"trial_{number:04d}"

    def logged(self, number: int) -> bool:
        """Whether trial *number* was written here (by this job or an earlier try)."""
        return has_events(self.log_dir / self._run_name(number))

    def replay(self, study) -> int:
        """Write the finished trials of a continued study that this folder lacks: all of them in a fresh folder (a
        pool job's retry), else those a job killed between the journal's write and the events' left out; returns
        how many."""
        from optuna.trial import TrialState

        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        return sum(self(study, trial) for trial in finished if not self.logged(trial.number))

    def close(self) -> None:
        self.writer.close()


def pack_events(log_dir, archive) -> Path:
    """Pack *log_dir* into the .tar *archive* (atomically) as tensorboard/<folder name>/..."""
    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        raise TensorBoardError(f"--tensorboard-tar {archive}: {log_dir} holds no events")
    return pack_folder(log_dir, archive, prefix=f"{ARCHIVE_ROOT}/{log_dir.name}/")
