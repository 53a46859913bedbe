"""Model files on disk: writing them, reading them, and checking what they claim before anything uses it.

A model file holds ``{"model": state_dict, "meta": {...}}`` in plain types only, so
``torch.load(weights_only=True)`` reads it. A model file is input a user hands to a job
or to the service, so everything read from it is checked here, before a model is built
from it: the metadata's types and ranges (meta a mapping; the classes this project's;
num_classes one more than them; the image size a positive integer within
defaults.MODEL_IMAGE_SIZE_MAX; thresholds numbers in [0, 1]; the recorded inference-time settings within
their ranges, :func:`_check_postprocessing`) and the box predictor's
shapes against the classes it declares, and the weights finite (no NaN or infinity: a diverged
training's weights load and run, and find no face in any photo). A problem is one :class:`ModelError` line naming
the file, which the job runner turns into exit 2; a file that passes never reaches a
KeyError, a float('abc') or a silently empty answer later.

utils/detection/model.py builds the architecture; this module knows nothing of it
except the backbone names it is handed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .. import defaults as D
from ..classes import CLASSES, LABEL_OF, NUM_CLASSES
from ..errors import InputError, is_finite_number, not_readable, shown
from ..provenance import code_version, package_versions
from ..stop import require_job_output
from .checkpoint import save_torch_file, torch_file_problem

MODEL_FILE_FORMAT = 1
# The box predictor's tensors: the class scores have one row per class (background
# included), the box regression four per class.
CLASS_SCORE_ROWS = ("roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias")
BOX_DELTA_ROWS = ("roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias")
REQUIRED_META = ("backbone", "num_classes", "image_size", "frozen_bn")


class ModelError(InputError):
    """A model cannot be built or loaded; the message names the file and the problem."""


def torch_load(path: Path, what: str):
    """torch.load on the CPU with weights_only=True; a missing or unreadable file is a one-line ModelError."""
    require_job_output(path, what, ModelError)  # missing, not a file, unreadable, or a stopped job's stand-in
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, not a torch file, or a pickle weights_only refuses
        raise not_readable(path, what, torch_file_problem(path, error), ModelError) from None


# ----------------------------------------------------------------------------- writing

def _plain(value):
    """Plain Python types only, so that torch.load(weights_only=True) accepts the file."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return str(value)


def model_metadata(model: nn.Module, extra: dict | None = None) -> dict:
    """The architecture, the classes, the pretrained weights, and the package and code versions the file is written
    with, then *extra*."""
    meta = {
        "format": MODEL_FILE_FORMAT,
        **model.architecture,
        "classes": list(CLASSES),
        "label_map": dict(LABEL_OF),
    }
    report = getattr(model, "weights_report", None)
    if report is not None:
        meta["pretrained"] = {"requested": report.requested, "loaded": report.loaded, "source": report.source}
        if report.sha256 is not None:  # a file given by path (utils.detection.model.WeightsReport)
            meta["pretrained"]["sha256"] = report.sha256
    meta.update(extra or {})
    if hasattr(model, "rpn") and hasattr(model, "roi_heads"):  # the model's own, over a loaded file's meta in *extra*
        meta["postprocessing"] = postprocessing(model)
    meta = {**_plain(meta), "packages": package_versions(), "code": code_version()}  # plain already
    # Through JSON and back, so that the file's bytes follow from the values alone: pickle writes a string object it
    # meets again as a reference to the first, and equal strings were one object in one run (a command line's
    # "none" given as a literal, run in-process) and two in another (the same command run as a process)
    return json.loads(json.dumps(meta))


# What a Faster R-CNN does after its layers at inference, named as torchvision's FasterRCNN takes them. The builders
# set them (utils/defaults.py: DETECTIONS_PER_IMAGE & co., or torchvision's own); the model file records them and
# load_model_file sets them again, so that the file and not today's defaults decides how the model detects: its
# operating threshold, working size and the estimators' rates were measured with these (the cap went from 200 to
# 1,000 boxes on 2026-12-07; a file written before this record existed runs at today's values).
POSTPROCESSING_COUNTS = ("rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test", "box_detections_per_img")
POSTPROCESSING_NMS_IOUS = ("rpn_nms_thresh", "box_nms_thresh")


def postprocessing(model: nn.Module) -> dict:
    """*model*'s inference-time settings (the counts, the NMS IoUs and the RPN's and box head's score floors) as
    plain numbers."""
    rpn, heads = model.rpn, model.roi_heads
    return {"rpn_pre_nms_top_n_test": int(rpn._pre_nms_top_n["testing"]),
            "rpn_post_nms_top_n_test": int(rpn._post_nms_top_n["testing"]),
            "box_detections_per_img": int(heads.detections_per_img),
            "rpn_nms_thresh": float(rpn.nms_thresh), "rpn_score_thresh": float(rpn.score_thresh),
            "box_nms_thresh": float(heads.nms_thresh), "box_score_thresh": float(heads.score_thresh)}


def set_postprocessing(model: nn.Module, record: Mapping | None) -> None:
    """Give *model* the inference-time settings a model file recorded (checked by check_model_meta); None leaves
    the builder's."""
    if record is None:
        return
    rpn, heads = model.rpn, model.roi_heads
    rpn._pre_nms_top_n["testing"] = record["rpn_pre_nms_top_n_test"]
    rpn._post_nms_top_n["testing"] = record["rpn_post_nms_top_n_test"]
    heads.detections_per_img = record["box_detections_per_img"]
    rpn.nms_thresh, rpn.score_thresh = float(record["rpn_nms_thresh"]), float(record["rpn_score_thresh"])
    heads.nms_thresh, heads.score_thresh = float(record["box_nms_thresh"]), float(record["box_score_thresh"])


def save_model_file(path, model: nn.Module, meta: dict | None = None) -> Path:
    """Write ``{"model": state_dict, "meta": {...}}`` atomically; meta gets :func:`model_metadata` added. Weights
    that are not finite are a ModelError and nothing is written: train checks each step's loss before its update,
    but the update after the last check can still leave NaN weights, which every reader would refuse."""
    payload = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "meta": model_metadata(model, meta)}
    if problem := non_finite_weights(payload["model"]):
        raise ModelError(f"{path}: not written: {problem} (the training diverged; lower the learning rate, --lr)")
    return save_torch_file(path, payload)


# ----------------------------------------------------------------------------- reading and checking

def read_model_payload(path, backbones) -> tuple[dict, dict]:
    """(state dict, meta) of the model file *path*, every claim checked (module docstring);
    *backbones*: the names utils/detection/model.py can build."""
    path = Path(path)
    payload = torch_load(path, "model file")
    if not isinstance(payload, Mapping) or "model" not in payload or "meta" not in payload:
        raise ModelError(f"{path}: not a model file (expected a mapping with keys 'model' and 'meta')")
    meta, state = payload["meta"], payload["model"]
    check_model_meta(meta, path, backbones)
    check_state_shapes(state, meta["num_classes"], path)
    if problem := non_finite_weights(state):
        raise ModelError(f"{path}: {problem}: the training that wrote it diverged; not used")
    return state, meta


def non_finite_weights(state: Mapping) -> str | None:
    """What is not finite in the tensors of the state dict *state* ("the weights hold 3 NaN values in
    roi_heads.box_head.fc6.weight, and 2 more tensors hold NaN or infinite values"), or None when every
    floating-point value is finite. A diverged training's NaN reaches every score through the first layer that
    holds one: NaN scores pass no threshold, and the model finds no face in any photo, said by no error."""
    bad = [(name, tensor) for name, tensor in state.items() if isinstance(tensor, torch.Tensor)
           and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if not bad:
        return None
    name, tensor = bad[0]
    nan = int(torch.isnan(tensor).sum())
    infinite = int(torch.isinf(tensor).sum())
    counts = " and ".join(f"{count:,} {kind} value{'s' if count > 1 else ''}"
                          for count, kind in ((nan, "NaN"), (infinite, "infinite")) if count)
    more = f", and {len(bad) - 1} more tensor{'s hold' if len(bad) > 2 else ' holds'} NaN or infinite values" \
        if len(bad) > 1 else ""
    return f"the weights hold {counts} in {name}{more}"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_threshold(value, where: str, path) -> None:
    if not is_finite_number(value) or not 0.0 <= value <= 1.0:
        raise ModelError(f"{path}: model metadata {where} must be a number between 0 and 1, got {shown(value)}")


def check_model_meta(meta, path, backbones) -> None:
    """ModelError naming *path* and the first claim of *meta* that is of the wrong type or out of range."""
    if not isinstance(meta, Mapping):
        raise ModelError(f"{path}: model metadata must be a mapping, got {type(meta).__name__} {shown(meta)}")
    for key in REQUIRED_META:
        if key not in meta:
            raise ModelError(f"{path}: model metadata lacks {key!r}")
    if meta.get("format", MODEL_FILE_FORMAT) != MODEL_FILE_FORMAT:
        raise ModelError(f"{path}: model file format {shown(meta['format'])}; this version reads format "
                         f"{MODEL_FILE_FORMAT}")
    if meta["backbone"] not in backbones:
        raise ModelError(f"{path}: model metadata backbone {shown(meta['backbone'])} is not one of "
                         f"{', '.join(backbones)}")
    classes = meta.get("classes", list(CLASSES))  # files from before classes were stored hold this project's
    if not isinstance(classes, list) or classes != list(CLASSES):
        raise ModelError(f"{path}: model classes {shown(classes)} differ from this project's {list(CLASSES)} "
                         "(its label numbers would be misread)")
    if not _is_int(meta["num_classes"]) or meta["num_classes"] != NUM_CLASSES:
        raise ModelError(f"{path}: model metadata num_classes must be {NUM_CLASSES} (the {len(CLASSES)} classes "
                         f"and background), got {shown(meta['num_classes'])}")
    image_size = meta["image_size"]
    if not _is_int(image_size) or not 32 <= image_size <= D.MODEL_IMAGE_SIZE_MAX:
        raise ModelError(f"{path}: model metadata image_size must be a whole number of pixels from 32 to "
                         f"{D.MODEL_IMAGE_SIZE_MAX}, got {shown(image_size)}")
    if not isinstance(meta["frozen_bn"], bool):
        raise ModelError(f"{path}: model metadata frozen_bn must be true or false, got {shown(meta['frozen_bn'])}")
    trainable = meta.get("trainable_layers", 0)
    if not _is_int(trainable) or trainable < 0:
        raise ModelError(f"{path}: model metadata trainable_layers must be a whole number >= 0, got {shown(trainable)}")
    _check_stored_threshold(meta.get("operating_threshold"), "operating_threshold", path)
    _check_stored_threshold(meta.get("quantification"), "quantification", path)
    _check_inference_size(meta.get("inference_size"), path)
    _check_postprocessing(meta.get("postprocessing"), path)


def _check_postprocessing(record, path) -> None:
    """The inference-time settings (:func:`postprocessing`): a mapping or absent, with every setting: the counts
    whole numbers from 1 to defaults.POSTPROCESSING_COUNT_MAX (a file cannot make one photo keep millions of
    boxes); the NMS IoUs above 0 and at most 1 (at 0 any two overlapping faces of a crowd would be one); the RPN's
    score floor from 0 to under 1 and the box head's from 0 to defaults.DETECTION_FLOOR (torchvision keeps a box
    scoring above the floor: at 1 no box is ever kept, and above DETECTION_FLOOR the boxes the probabilistic counts
    and a lower --score-threshold read would be missing, each without a word)."""
    if record is None:
        return
    if not isinstance(record, Mapping):
        raise ModelError(f"{path}: model metadata postprocessing must be a mapping, got {shown(record)}")
    for key in POSTPROCESSING_COUNTS:
        value = record.get(key)
        if not _is_int(value) or not 1 <= value <= D.POSTPROCESSING_COUNT_MAX:
            raise ModelError(f"{path}: model metadata postprocessing.{key} must be a whole number from 1 to "
                             f"{D.POSTPROCESSING_COUNT_MAX:,}, got {shown(value)}")
    for key in POSTPROCESSING_NMS_IOUS:
        value = record.get(key)
        if not (is_finite_number(value) and 0 < value <= 1):
            raise ModelError(f"{path}: model metadata postprocessing.{key} must be a number above 0 and at most 1, "
                             f"got {shown(value)}")
    rpn_floor, box_floor = record.get("rpn_score_thresh"), record.get("box_score_thresh")
    if not (is_finite_number(rpn_floor) and 0 <= rpn_floor < 1):
        raise ModelError(f"{path}: model metadata postprocessing.rpn_score_thresh must be a number from 0 to under 1, "
                         f"got {shown(rpn_floor)}")
    if not (is_finite_number(box_floor) and 0 <= box_floor <= D.DETECTION_FLOOR):
        raise ModelError(f"{path}: model metadata postprocessing.box_score_thresh must be a number from 0 to "
                         f"{D.DETECTION_FLOOR:g}, got {shown(box_floor)}")


def _check_stored_threshold(record, key: str, path) -> None:
    """The threshold records train stores (operating_threshold, quantification): a mapping or absent,
    its score_threshold a number in [0, 1], its chosen_on text or absent."""
    if record is None:
        return
    if not isinstance(record, Mapping):
        raise ModelError(f"{path}: model metadata {key} must be a mapping, got {shown(record)}")
    if record.get("score_threshold") is not None:
        _check_threshold(record["score_threshold"], f"{key}.score_threshold", path)
    if record.get("chosen_on") is not None and not isinstance(record["chosen_on"], str):
        raise ModelError(f"{path}: model metadata {key}.chosen_on must be text, got {shown(record['chosen_on'])}")
    if key == "quantification" and record.get("images"):
        _check_calibration(record, path)


def _check_inference_size(record, path) -> None:
    """The working size train chose on validation (inference_size.choose_inference_size): a mapping or absent,
    its image_size whole pixels within the limit a model file's image_size has (every image is resized to it),
    its flip TTA and box voting choices true or false, the IoU boxes vote at above 0 and at most 1 (a kept box
    votes for itself at IoU 1: above it, no box would vote and every voted box would come out NaN)."""
    if record is None:
        return
    if not isinstance(record, Mapping):
        raise ModelError(f"{path}: model metadata inference_size must be a mapping, got {shown(record)}")
    size = record.get("image_size")
    if size is not None and (not _is_int(size) or not 32 <= size <= D.MODEL_IMAGE_SIZE_MAX):
        raise ModelError(f"{path}: model metadata inference_size.image_size must be a whole number of pixels from "
                         f"32 to {D.MODEL_IMAGE_SIZE_MAX}, got {shown(size)}")
    if record.get("chosen_on") is not None and not isinstance(record["chosen_on"], str):
        raise ModelError(f"{path}: model metadata inference_size.chosen_on must be text, "
                         f"got {shown(record['chosen_on'])}")
    if record.get("tta") is not None and not isinstance(record["tta"], bool):  # inference_size.choose_tta
        raise ModelError(f"{path}: model metadata inference_size.tta must be true or false, got {shown(record['tta'])}")
    if record.get("box_voting") is not None and not isinstance(record["box_voting"], bool):  # choose_box_voting
        raise ModelError(f"{path}: model metadata inference_size.box_voting must be true or false, "
                         f"got {shown(record['box_voting'])}")
    vote_iou = record.get("box_vote_iou")
    if vote_iou is not None and not (is_finite_number(vote_iou) and 0 < vote_iou <= 1):
        raise ModelError(f"{path}: model metadata inference_size.box_vote_iou must be a number above 0 and at most 1, "
                         f"got {shown(vote_iou)}")


def _check_calibration(record: Mapping, path) -> None:
    """The validation rates train stores (quantify.calibration_record): read as predict and evaluate will,
    so that a malformed record is refused here and not after every image has run."""
    from .quantify import Calibration

    try:
        Calibration.from_record(record)
    except (KeyError, TypeError, ValueError) as problem:
        raise ModelError(f"{path}: model metadata quantification is not a calibration record "
                         f"({type(problem).__name__}: {shown(str(problem))})") from None
    size = record.get("working_size")  # absent in files from before 2026-12-05
    if size is not None and (not _is_int(size) or not 32 <= size <= D.MODEL_IMAGE_SIZE_MAX):
        raise ModelError(f"{path}: model metadata quantification.working_size must be a whole number of pixels "
                         f"from 32 to {D.MODEL_IMAGE_SIZE_MAX}, got {shown(size)}")
    if record.get("tta") is not None and not isinstance(record["tta"], bool):
        raise ModelError(f"{path}: model metadata quantification.tta must be true or false, got {shown(record['tta'])}")


def check_state_shapes(state, num_classes: int, path) -> None:
    """ModelError naming *path* unless *state* is a mapping of names to tensors whose box predictor has
    *num_classes* class rows and 4 box rows per class (the classes the metadata declares)."""
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in state.items()):
        raise ModelError(f"{path}: the model's weights are not a mapping of names to tensors")
    for names, rows, what in ((CLASS_SCORE_ROWS, num_classes, "class score"),
                              (BOX_DELTA_ROWS, 4 * num_classes, "box regression")):
        for name in names:
            if name not in state:
                raise ModelError(f"{path}: the model's weights lack {name} (not a Faster R-CNN of this project)")
            outputs = state[name].shape[0] if state[name].dim() else 0
            if outputs != rows:
                raise ModelError(f"{path}: {name} has {outputs} outputs, but the metadata declares "
                                 f"{num_classes - 1} classes (+ background): the {what} needs {rows}")
