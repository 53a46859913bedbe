"""train's --params file (best_hpo_params.json): each value is checked as its bin/train.py flag checks it.

PARAM_TYPES holds the argparse type (utils/cli.py) of every number the file may set, and bin/train.py's flags
take their type from it, so a value the command line refuses (nan, inf, a negative count, an image size of
100000) is refused from the file too: one ParamsFileError line naming the file and the key, exit 2.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

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
