"""Faster R-CNN model factory, trainable-layer control and self-describing model files.

Backbones (chosen by name):

- ``mobilenet_v2_fpn`` (the CPU default): torchvision's MobileNetV2 with ImageNet
  weights, a feature pyramid built with ``create_feature_extractor`` over the
  stride-8, 16 and 32 stages (plus a max-pooled stride-64 level), and anchors
  sized for faces that are often 15-60 px: two sizes per level, (16, 24) px
  on stride 8, (32, 48) on 16, (64, 96) on 32, (128, 256) on the pool level, aspect ratios
  (height/width) 0.75, 1.0 and 1.33. A stride-4 level
  was left out on purpose: on a CPU its 3x3 FPN and RPN convolutions would cost
  more than the whole backbone, and a 16 px anchor on the stride-8 grid still
  overlaps every face by IoU > 0.5 somewhere.
- ``retinaface_mnet025``: a face-pretrained first stage. The backbone is RetinaFace
  MobileNet-0.25's trunk with its FPN and SSH maps (64 channels at strides 8, 16, 32),
  the RPN is its face/background and box heads (its anchors, centred on the cells, and
  box coder weights 10, 10, 5, 5), all from WIDER FACE (utils/detection/retinaface.py);
  the RoI heads learn the three mask states and refine the boxes. Its weights are the
  converted file ``weights provision`` caches; when that file is absent the factory
  says so in one line and builds ``mobilenet_v2_fpn`` with ImageNet weights instead.
- ``mobilenet_v3_large_fpn``, ``resnet50_fpn``, ``resnet50_fpn_v2``: torchvision's
  own builders.

Weights (``weights=``): ``none``; ``imagenet`` (backbone only); ``coco`` (the
whole detector, box predictor replaced for our 4 classes; MobileNetV2 has no
COCO detector, so it uses ImageNet); ``widerface`` (RetinaFace's backbone and RPN;
the one pretrained kind of ``retinaface_mnet025``, which any kind but ``none``
gives: for it ``imagenet``, the default, means its pretrained backbone too); or a
PATH to a weight file. Pretrained
weights come from ``weights_file`` when given (workflow workers have no
internet, so weights reach jobs as input files), else from torchvision's cache
or a download. When what was asked for cannot be had, the factory falls back
(COCO -> ImageNet -> none) and says so in one log line; it never fails
because it is offline. A weight file given explicitly that cannot be read is
an error (:class:`ModelError`), because the user asked for that file.

Model files (``save_model_file``/``load_model_file``) hold
``{"model": state_dict, "meta": {...}}`` with plain types only, so
``torch.load(weights_only=True)`` reads them, and ``meta`` holds everything
needed to rebuild the architecture without any pretrained weights. Their reading,
writing and the checks of what a file claims live in utils/detection/model_file.py.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models import detection
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .. import defaults as D
from ..classes import NUM_CLASSES
from ..provenance import file_sha256
from .model_file import MODEL_FILE_FORMAT, ModelError, model_metadata, read_model_payload, save_model_file  # noqa: F401
from .model_file import non_finite_weights, set_postprocessing, torch_load as _torch_load  # model files: there
from .weights import BACKBONES, RETINAFACE_BACKBONE, WEIGHT_KINDS, weights_file_given

log = logging.getLogger(__name__)

# Backbone stages that --trainable-layers and a stage's trainable_layers count in: known before the model
# is built, so that training_plan.make_plan checks a plan against them with every other flag, before any file
# is read or written (build_model checks that the stages it builds are as many).
BACKBONE_STAGES = {"mobilenet_v2_fpn": 6, RETINAFACE_BACKBONE: 5, "mobilenet_v3_large_fpn": 6, "resnet50_fpn": 5,
                   "resnet50_fpn_v2": 5}

# MobileNetV2 feature stages used by the pyramid: (node name, channels, stride).
MOBILENET_V2_RETURN_NODES = (("features.6", 32, 8), ("features.13", 96, 16), ("features.18", 1280, 32))
MOBILENET_V2_FPN_CHANNELS = 128  # 256 (torchvision's choice) doubles the CPU cost of FPN, RPN and box head
FACE_ANCHOR_SIZES = ((16, 24), (32, 48), (64, 96), (128, 256))  # one tuple per pyramid level, pool level last
FACE_ASPECT_RATIOS = (0.75, 1.0, 1.33)  # height / width: faces are a little taller than wide
DOWNLOAD_TIMEOUT_S = D.WEIGHTS_DOWNLOAD_TIMEOUT_S


@dataclass
class WeightsReport:
    """What was actually loaded, for logs and the model file's metadata."""

    requested: str
    loaded: str  # "none" | "imagenet" | "coco" | "widerface" | "file"
    source: str | None
    message: str
    # of a file given by path (--weights-file, --weights PATH): what trained the model, whatever lies there later
    # (torchvision's and the provisioned RetinaFace files carry theirs in their names)
    sha256: str | None = None


# ----------------------------------------------------------------------------- weights

def _torchvision_weights(backbone: str):
    """(COCO detector weights enum, ImageNet backbone weights enum) for a backbone name."""
    from torchvision.models import MobileNet_V2_Weights, MobileNet_V3_Large_Weights, ResNet50_Weights

    return {
        "mobilenet_v2_fpn": (None, MobileNet_V2_Weights.IMAGENET1K_V1),
        "mobilenet_v3_large_fpn": (detection.FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1,
                                   MobileNet_V3_Large_Weights.IMAGENET1K_V1),
        "resnet50_fpn": (detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1, ResNet50_Weights.IMAGENET1K_V1),
        "resnet50_fpn_v2": (detection.FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1, ResNet50_Weights.IMAGENET1K_V1),
        RETINAFACE_BACKBONE: (None, None),  # its pretrained weights are WIDER FACE's (weights.py)
    }[backbone]


@contextlib.contextmanager
def _socket_timeout(seconds):
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _fetch_torchvision_state(weights_enum) -> tuple[dict | None, str]:
    """The state dict of a torchvision weights enum from the hub cache or a download; (None, reason) if neither."""
    filename = Path(weights_enum.url).name
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            state = weights_enum.get_state_dict(progress=False, check_hash=True)
    except Exception as error:  # offline (URLError, timeout), or a corrupt cached file
        return None, f"{filename} not cached and not downloadable ({type(error).__name__}: {error})"
    return state, filename


def read_weight_file(path) -> dict:
    """A state dict from *path*: a plain state dict, or a model file written by :func:`save_model_file`."""
    path = Path(path)
    loaded = _torch_load(path, "weight file")
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]  # a model file or a training checkpoint
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ModelError(f"{path}: does not hold a state dict of tensors")
    if problem := non_finite_weights(loaded):  # training from them would stop at its first step's NaN loss
        raise ModelError(f"{path}: {problem}: the training that wrote it diverged; not used")
    return loaded


def _is_detector_state(state: dict) -> bool:
    return any(key.startswith(("rpn.", "roi_heads.")) for key in state)


def _load_detector_state(model: nn.Module, state: dict, source: str) -> None:
    """Load a whole detector's weights, skipping tensors whose shape differs (the box predictor for 91 classes)."""
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(usable))
    missing = sorted(k for k in own if k not in usable and not k.endswith("num_batches_tracked"))
    if not usable or len(usable) < 0.5 * len(own):
        raise ModelError(f"{source}: only {len(usable)} of {len(own)} tensors fit this architecture; "
                         "is it a detector of a different backbone?")
    model.load_state_dict(usable, strict=False)
    if skipped or missing:
        log.info("%s: %d tensors loaded, %d skipped (shape/name differs), %d left at initialisation (%s)",
                 source, len(usable), len(skipped), len(missing), ", ".join(missing[:4]))


def _load_backbone_state(model: nn.Module, backbone: str, state: dict, source: str) -> None:
    """Load ImageNet classification weights into the detector's backbone body."""
    body = model.backbone.body
    own = body.state_dict()
    if backbone == "mobilenet_v3_large_fpn":
        # torchvision's body is the `features` Sequential itself: "features.3.x" -> "3.x"
        renamed = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    else:
        # resnet body keeps the classifier's names; MobileNetV2's feature extractor keeps "features.N."
        renamed = dict(state)
    usable = {k: v for k, v in renamed.items() if k in own and own[k].shape == v.shape}
    wanted = [k for k in own if not k.endswith("num_batches_tracked")]
    missing = [k for k in wanted if k not in usable]
    if missing:
        raise ModelError(f"{source}: not ImageNet weights for {backbone} "
                         f"({len(missing)} of {len(wanted)} backbone tensors missing, e.g. {missing[0]})")
    body.load_state_dict(usable, strict=False)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d inside *module* by torchvision's FrozenBatchNorm2d (fixed statistics).

    Pretrained backbones keep their ImageNet/COCO statistics: detection batches
    of 2-8 images are too small to estimate new ones (torchvision does the same).
    """
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = misc_nn_ops.FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                frozen.weight.copy_(child.weight)
                frozen.bias.copy_(child.bias)
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


# ----------------------------------------------------------------------------- architectures

def _mobilenet_v2_fpn(num_classes: int, frozen_bn: bool, fpn_channels: int, transform_kwargs: dict):
    from torchvision.models import mobilenet_v2
    from torchvision.models.feature_extraction import create_feature_extractor

    norm_layer = misc_nn_ops.FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    classifier = mobilenet_v2(weights=None, norm_layer=norm_layer)
    # Stages as torchvision's mobilenet_backbone counts them: the stem, each
    # down-sampling block (_is_cn) and the last 1x1 conv start a new stage.
    features = classifier.features
    starts = [0] + [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)] + [len(features) - 1]
    stages = [[f"features.{i}." for i in range(start, end)]
              for start, end in zip(starts, starts[1:] + [len(features)])]

    return_nodes = {name: str(level) for level, (name, _, _) in enumerate(MOBILENET_V2_RETURN_NODES)}
    body = create_feature_extractor(classifier, return_nodes=return_nodes)
    fpn = FeaturePyramidNetwork(in_channels_list=[c for _, c, _ in MOBILENET_V2_RETURN_NODES],
                                out_channels=fpn_channels, extra_blocks=LastLevelMaxPool())
    backbone = _BodyWithFPN(body, fpn, fpn_channels)
    anchors = AnchorGenerator(sizes=FACE_ANCHOR_SIZES, aspect_ratios=(FACE_ASPECT_RATIOS,) * len(FACE_ANCHOR_SIZES))
    model = detection.FasterRCNN(
        backbone, num_classes=num_classes, rpn_anchor_generator=anchors,
        box_detections_per_img=D.DETECTIONS_PER_IMAGE, box_batch_size_per_image=D.OWN_ROI_BATCH_SIZE,
        rpn_pre_nms_top_n_test=D.RPN_PRE_NMS_TOP_N_TEST, rpn_post_nms_top_n_test=D.RPN_POST_NMS_TOP_N_TEST,
        **transform_kwargs)
    return model, stages


class _BodyWithFPN(nn.Module):
    """A feature extractor followed by an FPN, with the ``out_channels`` FasterRCNN needs."""

    def __init__(self, body: nn.Module, fpn: nn.Module, out_channels: int):
        super().__init__()
        self.body = body
        self.fpn = fpn
        self.out_channels = out_channels

    def forward(self, x):
        return self.fpn(self.body(x))


def _retinaface_detector(num_classes: int, transform_kwargs: dict):
    """Faster R-CNN over RetinaFace's backbone, with its heads as the RPN (module docstring)."""
    from torchvision.models.detection._utils import BoxCoder
    from torchvision.ops import MultiScaleRoIAlign

    from . import retinaface

    model = detection.FasterRCNN(
        retinaface.RetinaFaceBackbone(), num_classes=num_classes,
        rpn_anchor_generator=retinaface.anchor_generator(), rpn_head=retinaface.RetinaFaceRPNHead(),
        box_roi_pool=MultiScaleRoIAlign(featmap_names=["0", "1", "2"], output_size=7, sampling_ratio=2),
        box_detections_per_img=D.DETECTIONS_PER_IMAGE, box_batch_size_per_image=D.OWN_ROI_BATCH_SIZE,
        rpn_pre_nms_top_n_test=D.RPN_PRE_NMS_TOP_N_TEST, rpn_post_nms_top_n_test=D.RPN_POST_NMS_TOP_N_TEST,
        **retinaface.TRANSFORM_NORMALISATION, **transform_kwargs)
    # The pretrained box head predicts offsets scaled by RetinaFace's variances (0.1, 0.2).
    model.rpn.box_coder = BoxCoder(retinaface.BOX_CODER_WEIGHTS)
    return model, [list(stage) for stage in retinaface.BODY_STAGES]


def _load_retinaface_state(model: nn.Module, state: dict, source: str) -> None:
    """The converted WIDER FACE RetinaFace into the detector's backbone and RPN head, shapes checked."""
    from . import retinaface

    try:
        retinaface.check_state(state, source)
    except retinaface.ConversionError as error:
        raise ModelError(f"{error}; delete it and run: python -m utils.detection.weights provision") from None
    model.backbone.load_state_dict(retinaface.backbone_state(state))
    model.rpn.head.load_state_dict(retinaface.rpn_head_state(state))


def _is_retinaface_state(state: dict) -> bool:
    return "class_head.0.weight" in state and any(key.startswith("backbone.fpn.layer_blocks.") for key in state)


def _torchvision_detector(backbone: str, num_classes: int, frozen_bn: bool, transform_kwargs: dict):
    builder = {
        "mobilenet_v3_large_fpn": detection.fasterrcnn_mobilenet_v3_large_fpn,
        "resnet50_fpn": detection.fasterrcnn_resnet50_fpn,
        "resnet50_fpn_v2": detection.fasterrcnn_resnet50_fpn_v2,
    }[backbone]
    # Built without weights (weights are loaded by us, from a file or the cache);
    # without weights the builders leave every parameter trainable, and
    # set_trainable_layers() applies the requested number afterwards.
    model = builder(weights=None, weights_backbone=None, num_classes=num_classes,
                    trainable_backbone_layers=None, **transform_kwargs)
    body = model.backbone.body
    if frozen_bn and backbone != "resnet50_fpn_v2":
        # torchvision's builders use FrozenBatchNorm2d in pretrained mobilenet_v3 /
        # resnet50 backbones; resnet50_fpn_v2 keeps trainable BatchNorm everywhere.
        freeze_batchnorm(body)
    if backbone.startswith("resnet50"):
        stages = [["conv1.", "bn1."], ["layer1."], ["layer2."], ["layer3."], ["layer4."]]
    else:
        children = list(body.named_children())
        starts = [0] + [i for i, (_, block) in enumerate(children) if getattr(block, "_is_cn", False)]
        starts.append(len(children) - 1)
        stages = [[f"{children[i][0]}." for i in range(start, end)]
                  for start, end in zip(starts, starts[1:] + [len(children)])]
    return model, stages


def transform_sizes(image_size: int) -> dict:
    """GeneralizedRCNNTransform sizes: the longer image side becomes *image_size* pixels.

    min_size = max_size = image_size makes the scale min(size/short, size/long) =
    size/long, so every image fits in an image_size x image_size square: the
    cost per image is bounded whatever the photo's shape.
    """
    if image_size < 32:
        raise ModelError(f"image size {image_size} is too small (at least 32 px)")
    return {"min_size": int(image_size), "max_size": int(image_size)}


def set_trainable_layers(model: nn.Module, trainable_layers: int) -> None:
    """Train the last *trainable_layers* backbone stages (0 freezes the whole backbone body).

    The FPN, RPN and box head always train. Used both for --trainable-layers
    and for the two-stage schedule (0 for the first N epochs, then the setting).
    """
    stages = model.backbone_stages
    if not 0 <= trainable_layers <= len(stages):
        raise ModelError(f"trainable layers must be between 0 and {len(stages)} for this backbone, "
                         f"got {trainable_layers}")
    trainable_prefixes = tuple(p for stage in stages[len(stages) - trainable_layers:] for p in stage)
    for name, parameter in model.backbone.body.named_parameters():
        parameter.requires_grad_(bool(trainable_prefixes) and name.startswith(trainable_prefixes))


def freeze_backbone(model: nn.Module) -> None:
    set_trainable_layers(model, 0)


def _retinaface_weights(weights: str, notes: list) -> tuple[str, str, Path | None]:
    """(backbone, weights, file) for a pretrained retinaface_mnet025 request: the converted WIDER FACE
    file, else weights.job_weights' fallback (mobilenet_v2_fpn, ImageNet); *notes* gets what was substituted."""
    from .weights import job_weights

    backbone, path, fallback = job_weights(RETINAFACE_BACKBONE)
    if fallback:
        notes.append(fallback)
        return backbone, "imagenet", path
    if weights == "coco":  # imagenet means "the pretrained backbone": WIDER FACE's for this one, said in the message
        notes.append(f"no COCO detector exists for {RETINAFACE_BACKBONE}")
    return backbone, "widerface", path


def build_model(backbone: str = D.BACKBONE, num_classes: int = NUM_CLASSES, weights: str = D.WEIGHTS,
                weights_file=None, trainable_layers: int = D.TRAINABLE_LAYERS, image_size: int = D.IMAGE_SIZE,
                _frozen_bn: bool | None = None) -> nn.Module:
    """A torchvision Faster R-CNN for *num_classes* (background included) with the named backbone.

    ``model.weights_report`` says what was loaded; ``model.architecture`` is the
    metadata :func:`load_model_file` needs to rebuild it.
    """
    if backbone not in BACKBONES:
        raise ModelError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    transform_kwargs = transform_sizes(image_size)

    # Decide which weights to load before building: pretrained backbones use frozen BatchNorm.
    state, kind, source, source_sha256, notes = None, "none", None, None, []
    if _frozen_bn is not None:  # rebuilding a saved model: its weights come later
        weights, weights_file = "none", None
    if weights == "none" and weights_file is not None:
        notes.append(f"weights=none given, so {weights_file} is not used")
    # --weights PATH, else --weights-file unless set aside: the rule train's and hpo's checks before torch follow
    weights_file = weights_file_given(weights, weights_file)
    if weights not in WEIGHT_KINDS:
        weights = "file"
    if backbone == RETINAFACE_BACKBONE and weights != "none" and weights_file is None:
        backbone, weights, weights_file = _retinaface_weights(weights, notes)
    elif weights == "widerface":
        notes.append(f"WIDER FACE weights exist for {RETINAFACE_BACKBONE} only")
        weights = "imagenet"
    coco_enum, imagenet_enum = _torchvision_weights(backbone)
    if weights_file is not None:
        state = read_weight_file(weights_file)
        source, source_sha256 = str(weights_file), file_sha256(weights_file)
        if _is_retinaface_state(state):  # the converted file, handed to a workflow job as an input
            if backbone != RETINAFACE_BACKBONE:
                raise ModelError(f"{weights_file}: RetinaFace weights fit backbone {RETINAFACE_BACKBONE} only, "
                                 f"not {backbone}")
            kind = "widerface"
        else:
            kind = "coco" if _is_detector_state(state) else "imagenet"
    elif weights == "coco" and kind == "none":
        if coco_enum is None:
            notes.append(f"no COCO detector exists for {backbone}")
        else:
            state, reason = _fetch_torchvision_state(coco_enum)
            if state is None:
                notes.append(f"COCO weights unavailable: {reason}")
            else:
                kind, source = "coco", reason
    if kind == "none" and weights in ("coco", "imagenet"):
        state, reason = _fetch_torchvision_state(imagenet_enum)
        if state is None:
            notes.append(f"ImageNet weights unavailable: {reason}")
        else:
            kind, source = "imagenet", reason

    # RetinaFace's batch norm is folded into its convolutions: it has none to freeze.
    frozen_bn = (kind not in ("none", "widerface")) if _frozen_bn is None else _frozen_bn
    if backbone == "mobilenet_v2_fpn":
        model, stages = _mobilenet_v2_fpn(num_classes, frozen_bn, MOBILENET_V2_FPN_CHANNELS, transform_kwargs)
    elif backbone == RETINAFACE_BACKBONE:
        model, stages = _retinaface_detector(num_classes, transform_kwargs)
    else:
        model, stages = _torchvision_detector(backbone, num_classes, frozen_bn, transform_kwargs)
    model.backbone_stages = stages
    if len(stages) != BACKBONE_STAGES[backbone]:  # a bug: the table above is out of date
        raise RuntimeError(f"{backbone} built {len(stages)} backbone stages, BACKBONE_STAGES says "
                           f"{BACKBONE_STAGES[backbone]}")

    if kind == "widerface":
        _load_retinaface_state(model, state, source)
    elif kind == "coco":
        _load_detector_state(model, state, source)
    elif kind == "imagenet":
        _load_backbone_state(model, backbone, state, source)

    if _frozen_bn is None:
        if kind == "none":
            why = "; ".join(notes) if notes else "none requested"
            message = f"{backbone}: no pretrained weights ({why}); training from scratch"
        else:
            what = {"coco": "COCO detector weights (box predictor re-initialised for "
                            f"{num_classes} classes)", "imagenet": "ImageNet backbone weights",
                    "widerface": "WIDER FACE RetinaFace backbone and RPN (RoI heads initialised for "
                                 f"{num_classes} classes)"}[kind]
            fallback = f" ({'; '.join(notes)})" if notes else ""
            message = f"{backbone}: {what} from {source}{fallback}"
        (log.warning if notes else log.info)(message)
        model.weights_report = WeightsReport(weights if weights != "file" else str(weights_file),
                                             kind, source, message, source_sha256)
    set_trainable_layers(model, trainable_layers)
    model.architecture = {
        "backbone": backbone,
        "num_classes": int(num_classes),
        "image_size": int(image_size),
        "trainable_layers": int(trainable_layers),
        "frozen_bn": bool(frozen_bn),
        **_anchor_metadata(backbone),
    }
    return model


def _anchor_metadata(backbone: str) -> dict:
    """The anchors the project chose for *backbone* (None where torchvision's builder chose them)."""
    if backbone == "mobilenet_v2_fpn":
        return {"anchor_sizes": [list(s) for s in FACE_ANCHOR_SIZES], "aspect_ratios": list(FACE_ASPECT_RATIOS)}
    if backbone == RETINAFACE_BACKBONE:
        from . import retinaface

        return {"anchor_sizes": [list(s) for s in retinaface.ANCHOR_SIZES], "aspect_ratios": [1.0]}
    return {"anchor_sizes": None, "aspect_ratios": None}


# ----------------------------------------------------------------------------- model files

def load_model_file(path, device="cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode on *device*, meta) from a file written by :func:`save_model_file`; what the file
    claims is checked first (utils/detection/model_file.py), so a bad file is one ModelError naming it."""
    path = Path(path)
    state, meta = read_model_payload(path, BACKBONES)
    try:
        model = build_model(meta["backbone"], num_classes=meta["num_classes"], weights="none",
                            trainable_layers=meta.get("trainable_layers", 0), image_size=meta["image_size"],
                            _frozen_bn=meta["frozen_bn"])
    except ModelError as error:  # a claim only the architecture checks: trainable_layers above its stage count
        raise ModelError(f"{path}: model metadata: {error}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[0]
        raise ModelError(f"{path}: weights do not match the {meta['backbone']} architecture ({first_line})") from None
    set_postprocessing(model, meta.get("postprocessing"))  # absent in files written before the record existed
    model.weights_report = None
    return model.to(device).eval(), meta
