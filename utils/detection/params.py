"""The hyperparameters of a training run (TrainParams) and train's --params file (best_hpo_params.json).

``resolve_params`` puts them together: a flag wins over the file, which wins over TrainParams' defaults
(utils/defaults.py). Each value of the file is checked as its bin/train.py flag checks it.

PARAM_TYPES holds the argparse type (utils/cli.py) of every number the file may set, and bin/train.py's flags
take their type from it, so a value the command line refuses (nan, inf, a negative count, an image size of
100000) is refused from the file too: one ParamsFileError line naming the file and the key, exit 2.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import defaults as D
from ..cli import (fraction, fraction_below_one, image_size_px, int_at_least, non_negative_float, non_negative_int,
                   positive_float, positive_int)
from ..errors import InputError, read_json, shown
from .model import BACKBONES
from .recipe import MIN_ROI_BATCH_SIZE

log = logging.getLogger(__name__)

PARAM_TYPES = {
    "lr": positive_float, "momentum": non_negative_float, "weight_decay": non_negative_float,
    "trainable_layers": non_negative_int, "batch_size": positive_int, "warmup_iters": non_negative_int,
    "clip_grad": non_negative_float, "freeze_backbone_epochs": non_negative_int, "hflip": fraction,
    "image_size": image_size_px, "photometric": fraction, "multiscale": fraction, "repeat_threshold": fraction,
    "ema_decay": fraction_below_one,
    "roi_batch_size": int_at_least(MIN_ROI_BATCH_SIZE, f"a whole number of at least {MIN_ROI_BATCH_SIZE} "
                                                       "(proposals per image, a quarter of them faces)"),
}
# The words the file may set: the choices of their bin/train.py flags.
PARAM_CHOICES = {"optimizer": ("sgd", "adamw"), "lr_schedule": ("cosine", "step"), "backbone": BACKBONES}
PARAMS_FILE_KEYS = (*PARAM_TYPES, *PARAM_CHOICES)


class ParamsFileError(InputError):
    """A --params file that cannot be read, or a value in it that its flag would refuse."""


def read_params_file(path) -> dict:
    """Hyperparameters from a JSON file: {"params": {...}}, {"best_params": {...}} or a flat dict.

    Each number passes the type of its flag (PARAM_TYPES), each word must be one of its flag's choices
    (PARAM_CHOICES); the first that does not is one ParamsFileError line naming the file and the key.
    Other keys (an HPO result's best_value, trial numbers) are logged as ignored."""
    path = Path(path)
    data = read_json(path, "params file", ParamsFileError)
    if isinstance(data, dict):
        data = data.get("params", data.get("best_params", data))
    if not isinstance(data, dict):
        raise ParamsFileError(f"{path}: expected a JSON object of hyperparameters")
    params, ignored = {}, []
    for key, value in data.items():
        if key in PARAM_TYPES:
            params[key] = _file_number(path, key, value)
        elif key in PARAM_CHOICES:
            if not isinstance(value, str) or value not in PARAM_CHOICES[key]:
                raise ParamsFileError(f"{path}: {key} must be one of {', '.join(PARAM_CHOICES[key])}, "
                                      f"got {shown(value)}")
            params[key] = value
        else:
            ignored.append(shown(key))
    if ignored:
        log.info("%s: ignoring keys %s", path, ", ".join(sorted(ignored)))
    return params


def _file_number(path: Path, key: str, value):
    """*value* of *key* in the params file *path*, passed through its flag's type as the flag's text would be."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ParamsFileError(f"{path}: {key} must be a number, got {shown(value)}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 8.0, as a JSON writer may put a whole number; float("8") is the same 8.0
    text = value if isinstance(value, str) else repr(value)
    try:
        return PARAM_TYPES[key](text)
    except argparse.ArgumentTypeError as problem:
        raise ParamsFileError(f"{path}: {key}: {problem}") from None


@dataclass(frozen=True)
class TrainParams:
    """Every hyperparameter of a training run (what --params files and HPO trials set); defaults: utils.defaults.

    Frozen: a change (the GPU recipe, a plan as trained) is a new value made with dataclasses.replace."""

    backbone: str = D.BACKBONE
    weights: str = D.WEIGHTS
    weights_file: str | None = None
    image_size: int = D.IMAGE_SIZE
    epochs: int = D.EPOCHS
    batch_size: int = D.BATCH_SIZE
    workers: int = D.LOADER_WORKERS  # -1: auto_workers(device)
    optimizer: str = D.OPTIMIZER
    lr: float = D.LR
    momentum: float = D.MOMENTUM
    weight_decay: float = D.WEIGHT_DECAY
    lr_schedule: str = D.LR_SCHEDULE
    warmup_iters: int = D.WARMUP_ITERS
    clip_grad: float = D.CLIP_GRAD
    trainable_layers: int = D.TRAINABLE_LAYERS
    freeze_backbone_epochs: int = D.FREEZE_BACKBONE_EPOCHS
    hflip: float = D.HFLIP
    photometric: float = D.PHOTOMETRIC
    multiscale: float = D.MULTISCALE
    repeat_threshold: float = D.REPEAT_THRESHOLD
    ema_decay: float = D.EMA_DECAY
    roi_batch_size: int | None = D.ROI_BATCH_SIZE  # proposals per image in the box head's loss; None: the model's
    time_budget: float | None = D.TIME_BUDGET  # minutes; when set, the steps (and epochs) are fitted to it
    max_steps: int | None = None  # training steps in all, the last epoch cut short; None: epochs x steps per epoch
    # A --time-budget run's [first, final] plans in steps (recipe.TimeBudget); given, they are replayed
    # instead of the clock (recipe.RecordedPlan). None: a budget run's Trainer.params record its own here.
    budget_plan: list | None = None
    # Staged training (utils.detection.stages): Stage objects, or their mappings {epochs, lr, trainable_layers,
    # name}; replaces epochs and freeze_backbone_epochs (training_plan.make_plan checks the schedule's flags);
    # a --time-budget run's Trainer.params record its fitted stages here. None: one stage of epochs.
    stages: list | tuple | None = D.STAGES
    amp: bool = D.AMP
    seed: int = D.SEED

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_params(flag_values: dict, params_file_values: dict) -> TrainParams:
    """Flags win over the params file, which wins over TrainParams' defaults.

    A flag value of None means "not given"; keys that are no TrainParams field are
    ignored, so *flag_values* may be ``vars(args)``.
    """
    values = TrainParams().to_dict()
    values.update(params_file_values)
    values.update({key: value for key, value in flag_values.items() if key in values and value is not None})
    return TrainParams(**values)
