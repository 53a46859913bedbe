"""The hyperparameters of a training run (TrainParams) and train's --params file (best_hpo_params.json).

``resolve_params`` puts them together: a flag wins over the file, which wins over TrainParams' defaults
(utils/defaults.py); on CUDA ``gpu_recipe`` then fills what neither set: larger batches and resnet50_fpn_v2
from COCO when its weights are in the torch cache (the Docker image fetches them at build time), and the
architecture's own proposals per image in the box loss. ``describe`` names the recipe's levers as set.
Each value of the file is checked as its bin/train.py flag checks it.

PARAM_TYPES holds the argparse type (utils/cli.py) of every number the file may set, and bin/train.py's flags
take their type from it, so a value the command line refuses (nan, inf, a negative count, an image size of
100000) is refused from the file too: one ParamsFileError line naming the file and the key, exit 2.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .. import defaults as D
from ..cli import (fraction, fraction_below_one, image_size_px, int_at_least, non_negative_float, non_negative_int,
                   open_fraction, positive_float, positive_int, require_set_inputs)
from ..errors import InputError, read_json, shown
from ..stop import require_job_output
from .weights import BACKBONES, weights_file_given

log = logging.getLogger(__name__)

# No torch here: bin/train.py's and bin/hpo.py's flags take their types and choices from this module, and a bad
# flag is refused before torch's import. The recipe (recipe.py) applies these values to the model.
MIN_ROI_BATCH_SIZE = 4  # proposals per image: a quarter (the faces at most) must still be one
BOX_LOSSES = ("smooth_l1", "giou")  # the box head's regression losses (recipe.set_box_head_training)

PARAM_TYPES = {
    "lr": positive_float, "momentum": fraction_below_one, "weight_decay": non_negative_float,
    "trainable_layers": non_negative_int, "batch_size": positive_int, "warmup_iters": non_negative_int,
    "clip_grad": non_negative_float, "freeze_backbone_epochs": non_negative_int, "hflip": fraction,
    "image_size": image_size_px, "photometric": fraction, "multiscale": fraction, "repeat_threshold": fraction,
    "ema_decay": fraction_below_one,
    "roi_batch_size": int_at_least(MIN_ROI_BATCH_SIZE, f"a whole number of at least {MIN_ROI_BATCH_SIZE} "
                                                       "(proposals per image, a quarter of them faces)"),
    "roi_fg_iou": open_fraction, "roi_bg_iou": open_fraction,
}
# The words the file may set: the choices of their bin/train.py flags.
PARAM_CHOICES = {"optimizer": ("sgd", "adamw"), "lr_schedule": ("cosine", "step"), "backbone": BACKBONES,
                 "box_loss": BOX_LOSSES}
PARAMS_FILE_KEYS = (*PARAM_TYPES, *PARAM_CHOICES)
# Numbers the file may also give as null, as a TrainParams dump writes them (a bench row's params, a run record's
# resolved ones): the architecture's own proposals per image, and no ignore band.
NULLABLE_PARAMS = ("roi_batch_size", "roi_bg_iou")


class ParamsFileError(InputError):
    """A --params file that cannot be read, or a value in it that its flag would refuse."""


class TrainingDataError(InputError):
    """No usable training data (an unreadable --params file is a ParamsFileError)."""


def require_weight_file(weights: str | None, weights_file) -> None:
    """The model builder's refusals of the starting weights' file (--weights PATH, else --weights-file unless
    --weights none sets it aside: weights.weights_file_given) that need no torch: missing, not a file, unreadable
    or a stopped job's stand-in (utils.stop.require_job_output, which its loader model_file.torch_load makes), in
    its words. Whether the file holds a state dict that fits the backbone is known only once torch reads it
    (model.read_weight_file, when the model is built)."""
    path = weights_file_given(weights, weights_file)
    if path is not None:
        require_job_output(path, "weight file")


def check_training_inputs(args) -> tuple[dict, list | None]:
    """(the --params file's values, the --stages) of train's flags, once its inputs are checked as reading them
    would: the data sets (utils.cli.require_set_inputs), the validation set given whole, the starting weights' file
    (require_weight_file), the --params and --stages files read. None of it needs torch: train makes these checks
    before it imports torch, so that a missing input is refused in a fraction of a second, not after the data sets
    were opened, paired and hashed."""
    from .stages import parse_stages  # YAML: imported only by a run that gets this far

    if args.val_images and not args.val_annotations:
        raise TrainingDataError("--val-images needs --val-annotations")
    if args.val_annotations and not args.val_images:  # else they were ignored: no validation, without a word
        raise TrainingDataError("--val-annotations needs --val-images")
    require_set_inputs(args.images, args.annotations)
    if args.val_images:
        require_set_inputs(args.val_images, args.val_annotations)
    require_weight_file(args.weights, args.weights_file)
    params_file = read_params_file(args.params) if args.params else {}
    stages = parse_stages(args.stages, "--stages") if args.stages else None  # the flag: a file boundary
    return params_file, stages


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
            params[key] = None if value is None and key in NULLABLE_PARAMS else _file_number(path, key, value)
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
    box_loss: str = D.BOX_LOSS     # the box head's regression loss (BOX_LOSSES)
    roi_fg_iou: float = D.ROI_FG_IOU  # IoU from which a sampled proposal trains the box head as a face
    roi_bg_iou: float | None = D.ROI_BG_IOU  # IoU below which as background; None: roi_fg_iou (no ignore band)
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


def background_iou(fg_iou: float, bg_iou: float | None) -> float:
    """The IoU below which a sampled proposal trains the box head as background: *bg_iou*, or *fg_iou* when it
    is None (no ignore band). A bound equal to *fg_iou* is no band either."""
    return fg_iou if bg_iou is None else bg_iou


def check_budget_plan(plan, where: str = "budget_plan") -> list:
    """*plan* as ``[first or None, final]`` of positive step counts, or an InputError naming *where*."""
    if not isinstance(plan, (list, tuple)) or len(plan) != 2:
        raise InputError(f"{where}: expected [first, final] steps of a --time-budget run, got {plan!r}")
    first, final = plan
    for name, value in (("first", first), ("final", final)):
        if value is None and name == "first":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{where}: the {name} plan must be a positive number of steps, got {value!r}")
    return [first, final]


# ----------------------------------------------------------------------------- the GPU recipe

GPU_BACKBONE = "resnet50_fpn_v2"
GPU_BATCH_SIZE = 8  # 8 images of 512-800 px fit in 16 GB with AMP; the lr is scaled linearly with it
GPU_IMAGE_SIZE = 640  # a default image size below it is raised to it


def gpu_recipe(params, given: set[str], device) -> tuple:
    """(*params* as a GPU affords them, the changes for the log): on CUDA, for every hyperparameter the
    user did not set (*given*): resnet50_fpn_v2 with COCO detector weights when they are in the torch
    cache (never a download), 8 images per batch with the learning rate scaled by 8 / batch size, the
    image size 640, and the architecture's own proposals per image in the box loss (the CPU default
    samples fewer to save time a GPU does not need to save). AMP is already on for CUDA. Elsewhere
    *params* come back unchanged. *params* (frozen TrainParams) are never written: the changes are a
    new value."""
    import torch

    if torch.device(device).type != "cuda":
        return params, []
    changed, changes = {}, []
    from .weights import cached_coco_weights

    if "backbone" not in given and "weights" not in given and cached_coco_weights(GPU_BACKBONE) is not None:
        changed.update(backbone=GPU_BACKBONE, weights="coco")
        changes.append(f"backbone {GPU_BACKBONE} with COCO weights (cached)")
    if "batch_size" not in given:
        if "lr" not in given:
            changed["lr"] = params.lr * GPU_BATCH_SIZE / params.batch_size
            changes.append(f"lr {changed['lr']:g} (linear scaling)")
        changed["batch_size"] = GPU_BATCH_SIZE
        changes.append(f"batch size {GPU_BATCH_SIZE}")
    if "image_size" not in given and params.image_size < GPU_IMAGE_SIZE:
        changed["image_size"] = GPU_IMAGE_SIZE
        changes.append(f"image size {GPU_IMAGE_SIZE}")
    if "roi_batch_size" not in given and params.roi_batch_size is not None:
        changed["roi_batch_size"] = None
        changes.append("the architecture's own RoIs per image in the box loss")
    return replace(params, **changed), changes


def describe(params) -> str:
    """One line naming the recipe's levers as set, for logs and bench tables."""
    parts = [f"{params.backbone} {params.image_size}px"]
    if params.multiscale:
        parts.append(f"multi-scale ±{params.multiscale:.0%}")
    if params.photometric:
        parts.append(f"photometric p={params.photometric:g}")
    if params.repeat_threshold:
        parts.append(f"repeat-factor t={params.repeat_threshold:g}")
    if params.ema_decay:
        parts.append(f"EMA {params.ema_decay:g}")
    if params.roi_batch_size is not None:
        parts.append(f"{params.roi_batch_size} RoIs/image")
    if params.box_loss != D.BOX_LOSS or params.roi_fg_iou != D.ROI_FG_IOU or params.roi_bg_iou is not None:
        band = ("" if background_iou(params.roi_fg_iou, params.roi_bg_iou) == params.roi_fg_iou
                else f", background below {params.roi_bg_iou:g}")
        parts.append(f"box loss {params.box_loss} from IoU {params.roi_fg_iou:g}{band}")
    return ", ".join(parts)

