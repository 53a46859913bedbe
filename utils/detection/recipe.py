"""The training recipe's levers, each switchable from TrainParams (bench/quality.py ablates them).

- ``train_transforms``: horizontal flip and torchvision's photometric distortion
  (brightness, contrast, saturation, hue, channel order), boxes moved by transforms.v2.
- ``set_train_sizes``: multi-scale training. Faces here are often under 30 px (a fifth
  of them under 16 px at 512 px), so each training image is resized to a longer side
  drawn from sizes around --image-size; evaluation keeps --image-size.
- ``RepeatFactorSampler``: repeat-factor sampling (LVIS, Gupta et al. 2019) of the images
  holding a rare class: ``mask_weared_incorrect`` is 3 % of the faces and in 11 % of the
  images of the real data set.
- ``make_loader``: the training DataLoader with the augmentation and the sampler above.
- ``build_ema``: an exponential moving average of the weights (torch's AveragedModel),
  what validation, the threshold choice and the model file use.
- ``set_roi_batch_size``: fewer region proposals per image in the box head's loss, a
  cheaper CPU step (mostly background proposals are dropped).
- ``set_box_head_training``: what the box head learns its boxes from: the IoU from which a
  proposal counts as a face (Cascade R-CNN's u), and the box loss (torchvision's smooth L1 on
  the encoded offsets, or the generalised IoU of the decoded boxes, Rezatofighi et al. 2019).
- ``TimeBudget``: --time-budget MINUTES; the number of epochs and the cosine length
  are fitted to the budget after timing the first training steps, and once more after
  the first epoch (validation included).

The GPU recipe (larger batches, COCO weights where cached) is a way of resolving the parameters:
utils.detection.params.gpu_recipe.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import generalized_box_iou_loss

from .. import defaults as D
from ..classes import CLASSES, NO_LABEL_MAP, LabelMap
from ..data.dataset import VocDetectionDataset, collate
from ..data.images import ImageError, image_size
from ..data.voc import parse_voc
from .inference import shrunk_shorter_side
from .params import BOX_LOSSES, MIN_ROI_BATCH_SIZE, background_iou

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- augmentation

def train_transforms(hflip: float, photometric: float = 0.0):
    """Online augmentation of a training image and its boxes; None when every lever is off."""
    from torchvision.transforms import v2 as T

    steps = []
    if photometric > 0:
        steps.append(T.RandomPhotometricDistort(p=photometric))
    if hflip > 0:
        steps.append(T.RandomHorizontalFlip(hflip))
    return T.Compose(steps) if steps else None


# ----------------------------------------------------------------------------- multi-scale

class MultiScaleRCNNTransform(GeneralizedRCNNTransform):
    """torchvision's transform, but in training each image's longer side is drawn from ``train_sizes``.

    torchvision's own multi-scale (a tuple of min_size) fixes the shorter side and caps the
    longer one at max_size; this project fits the longer side (min_size = max_size), so the
    drawn size must set both.
    """

    train_sizes: tuple[int, ...] = ()

    def resize(self, image, target=None):
        if not (self.training and self.train_sizes):
            return super().resize(image, target)
        size = float(self.train_sizes[int(torch.randint(len(self.train_sizes), (1,)).item())])
        saved = self.min_size, self.max_size
        self.min_size, self.max_size = (size,), size
        try:
            return super().resize(image, target)
        finally:
            self.min_size, self.max_size = saved


def multiscale_sizes(image_size: int, spread: float, step: int = D.MULTISCALE_STEP) -> tuple[int, ...]:
    """Longer sides from image_size*(1-spread) to image_size*(1+spread) in steps of *step* px; () when off."""
    if spread <= 0:
        return ()
    low = max(step, int(round(image_size * (1 - spread) / step)) * step)
    high = int(round(image_size * (1 + spread) / step)) * step
    return tuple(range(low, high + 1, step))


def too_thin_to_train(pairs, params) -> tuple[list, list[dict]]:
    """(the *pairs* a model of *params* (TrainParams) can train and validate on, [{file, problem}] of those whose
    image the smallest training size, a --multiscale draw, shrinks to no pixel row: torchvision refuses the batch
    that holds one, and inference (inference.too_thin) gives it no detections)."""
    smallest = min(multiscale_sizes(params.image_size, params.multiscale) or (params.image_size,))
    kept, skipped = [], []
    for pair in pairs:
        try:  # the size scan_pairs' decode saw, else the header's
            width, height = pair.image_size or image_size(pair.image)
        except (ImageError, OSError):
            kept.append(pair)  # the dataset reports an image it cannot read
            continue
        shrunk = shrunk_shorter_side(height, width, smallest, smallest)  # the longer side fit to the size
        if shrunk is None:
            kept.append(pair)
        else:
            skipped.append({"file": str(pair.image), "problem": f"{width}x{height} px is too thin to train on: at the "
                            f"smallest training size ({smallest} px) the shorter side would shrink to {shrunk:.2g} px"})
    return kept, skipped


def set_train_sizes(model, sizes: tuple[int, ...]) -> None:
    """Give *model* a transform that trains at *sizes* (evaluation is unchanged); () restores one size."""
    old = model.transform
    new = MultiScaleRCNNTransform(old.min_size, old.max_size, old.image_mean, old.image_std,
                                  size_divisible=old.size_divisible, fixed_size=old.fixed_size)
    new.train_sizes = tuple(int(s) for s in sizes)
    new.train(old.training)
    model.transform = new


def set_roi_batch_size(model, per_image: int | None) -> int:
    """Sample *per_image* proposals per image for the box head's loss (None keeps the model's own);
    returns the number the model now samples.

    On a CPU the box head's RoIAlign backward and its two 1024-wide layers cost about a quarter
    of a 512 px mobilenet_v2_fpn step at 256 proposals (bench/train_step.py --roi-batch-sizes);
    the sampler keeps at most a quarter of them as faces, so halving it mostly drops background
    proposals. Only training is affected: inference scores every proposal.
    """
    sampler = model.roi_heads.fg_bg_sampler
    if per_image is not None:
        if int(per_image) < MIN_ROI_BATCH_SIZE:
            raise ValueError(f"roi_batch_size must be at least {MIN_ROI_BATCH_SIZE} proposals per image, "
                             f"got {per_image}")
        sampler.batch_size_per_image = int(per_image)
    return sampler.batch_size_per_image


# ----------------------------------------------------------------------------- the box head's loss

GIOU_LOSS_WEIGHT = D.GIOU_LOSS_WEIGHT


class GIoURoIHeads(RoIHeads):
    """torchvision's RoIHeads, training its box regression on the generalised IoU of the decoded boxes
    instead of a smooth L1 on the encoded offsets; inference and the weights are torchvision's."""

    training_only = True  # inference.set_box_voting may replace it on a trained model

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        return [], giou_box_losses(class_logits, box_regression, labels, regression_targets, self.box_coder)


def giou_box_losses(class_logits, box_regression, labels, regression_targets, box_coder) -> dict:
    """torchvision's fastrcnn_loss with GIOU_LOSS_WEIGHT x (1 - GIoU) of each face proposal's box for its class,
    summed and divided by the sampled proposals, as torchvision divides its smooth L1.

    Both the predicted and the target offsets are decoded against one unit box rather than each proposal:
    decoding against a proposal shifts and scales both boxes alike along each axis, which leaves IoU and
    GIoU unchanged, so the proposals need not be carried here."""
    labels = torch.cat(labels, dim=0)
    regression_targets = torch.cat(regression_targets, dim=0)
    classification = F.cross_entropy(class_logits, labels)
    faces = torch.where(labels > 0)[0]
    per_class = box_regression.reshape(len(labels), -1, 4)[faces, labels[faces]]
    unit = per_class.new_tensor([[0.0, 0.0, 1.0, 1.0]]).expand(len(faces), 4)
    predicted = box_coder.decode_single(per_class.float(), unit)
    target = box_coder.decode_single(regression_targets[faces].float(), unit)
    box = GIOU_LOSS_WEIGHT * generalized_box_iou_loss(predicted, target, reduction="sum") / max(1, labels.numel())
    return {"loss_classifier": classification, "loss_box_reg": box}


def set_box_head_training(model, box_loss: str, fg_iou: float, bg_iou: float | None = None) -> None:
    """Train *model*'s box head with *box_loss* (BOX_LOSSES), counting a sampled proposal as a face from IoU
    *fg_iou* with it and as background below *bg_iou* (None: below *fg_iou*; torchvision: 0.5 for both;
    Cascade R-CNN's later stages 0.6 and 0.7, for boxes that fit more tightly). torchvision's sampler leaves
    the proposals between the two out of the loss. Only training changes."""
    if box_loss not in BOX_LOSSES:
        raise ValueError(f"box_loss {box_loss!r}: choose one of {', '.join(BOX_LOSSES)}")
    bg_iou = background_iou(fg_iou, bg_iou)
    if bg_iou > fg_iou:
        raise ValueError(f"roi_bg_iou {bg_iou:g} is above roi_fg_iou {fg_iou:g}: a proposal would be both")
    heads = model.roi_heads
    heads.proposal_matcher = det_utils.Matcher(fg_iou, bg_iou, allow_low_quality_matches=False)
    # the same module with another training forward: its state dict, and so the model file, are unchanged
    if box_loss == "giou":
        heads.__class__ = GIoURoIHeads
    elif isinstance(heads, GIoURoIHeads):
        heads.__class__ = RoIHeads


# ----------------------------------------------------------------------------- repeat-factor sampling

def repeat_factors(pairs, threshold: float, label_map: LabelMap = NO_LABEL_MAP) -> list[float]:
    """LVIS repeat factor per image: max over its classes c of max(1, sqrt(threshold / f_c)),
    f_c being the fraction of images holding class c. Threshold 0 gives 1.0 everywhere."""
    if threshold <= 0:
        return [1.0] * len(pairs)
    classes_per_image = []
    for pair in pairs:
        names = {obj.name for obj in parse_voc(pair.annotation, label_map).objects}
        classes_per_image.append(names & set(CLASSES))
    counts = {c: sum(c in names for names in classes_per_image) for c in CLASSES}
    fraction = {c: counts[c] / max(len(pairs), 1) for c in CLASSES}
    class_factor = {c: max(1.0, math.sqrt(threshold / fraction[c])) if fraction[c] else 1.0 for c in CLASSES}
    return [max([class_factor[c] for c in names], default=1.0) for names in classes_per_image]


class RepeatFactorSampler(torch.utils.data.Sampler):
    """Each epoch, image i appears floor(r_i) times plus once more with probability frac(r_i), shuffled.

    The draws use *generator* (seeded per epoch by the Trainer), so a resumed run sees
    the same batches. ``len`` is the expected count; an epoch may differ by a few images.
    """

    def __init__(self, factors: list[float], generator: torch.Generator):
        self.factors = torch.tensor(factors, dtype=torch.float64)
        self.generator = generator

    def __len__(self) -> int:
        return int(round(float(self.factors.sum())))

    def __iter__(self):
        whole = self.factors.floor()
        extra = torch.rand(len(self.factors), generator=self.generator, dtype=torch.float64) < (self.factors - whole)
        copies = (whole + extra).long()
        indices = torch.repeat_interleave(torch.arange(len(self.factors)), copies)
        order = torch.randperm(len(indices), generator=self.generator)
        return iter(indices[order].tolist())


# ----------------------------------------------------------------------------- the training loader

def make_loader(pairs, batch_size: int, workers: int, shuffle: bool, hflip: float = 0.0,
                generator: torch.Generator | None = None, pin_memory: bool = False,
                label_map: LabelMap = NO_LABEL_MAP, photometric: float = 0.0, repeat_threshold: float = 0.0):
    """A detection DataLoader; with *repeat_threshold* > 0 the images of rare classes are repeated (shuffled)."""
    dataset = VocDetectionDataset(pairs, transforms=train_transforms(hflip, photometric), label_map=label_map)
    sampler = None
    if repeat_threshold > 0:
        sampler = RepeatFactorSampler(repeat_factors(pairs, repeat_threshold, label_map), generator)
        shuffle = False  # the sampler shuffles
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=workers, collate_fn=collate,
        generator=generator, pin_memory=pin_memory, persistent_workers=False)


# ----------------------------------------------------------------------------- weight EMA

# The decay ramps up as decay * (1 - exp(-updates / EMA_RAMP_UPDATES)), as Ultralytics does (utils/defaults.py).
EMA_RAMP_UPDATES = D.EMA_RAMP_UPDATES


def build_ema(model, decay: float):
    """torch's AveragedModel holding an EMA of *model*'s parameters and buffers; None when decay is 0."""
    if decay <= 0:
        return None
    from torch.optim.swa_utils import AveragedModel

    def average(averaged, current, num_averaged):
        d = decay * (1 - math.exp(-float(num_averaged) / EMA_RAMP_UPDATES))
        return d * averaged + (1 - d) * current

    ema = AveragedModel(model, avg_fn=average, use_buffers=True)
    ema.module.eval()
    return ema


# ----------------------------------------------------------------------------- time budget

# An evaluation pass (validation loss in train mode, or inference) costs about this fraction of a training step
# per batch on a CPU: forward only, no backward (bench/train_step.py measures the step).
EVAL_STEP_FRACTION = 0.4


class TimeBudget:
    """Fits the number of training steps to ``minutes`` of training, validation and threshold choice.

    ``steps_timed`` training steps (after ``steps_skipped`` warm-up steps whose time includes
    one-off allocations) give the seconds per step, and each step is charged its share of
    the per-epoch validation:

        steps = steps done + (budget - elapsed - final) / (s/step + validation per epoch / steps per epoch)

    Once the first epoch has really been timed (validation included), the plan is fitted
    again from that epoch. The plan is in steps, not whole epochs, so the budget is used
    to the step: the last epoch is cut short where the plan ends. The plan can differ
    between two runs of the same seed (it depends on the machine's speed). Both plans are
    recorded (``budget_plan``: [first, final]; ``max_steps`` is the final one), and
    :class:`RecordedPlan` replays them: --max-steps alone would not, because the first
    plan set the cosine's length for the rest of the first epoch.
    """

    def __init__(self, minutes: float, steps_per_epoch: int, val_batches: int, validations_per_epoch: int,
                 steps_skipped: int = 2, steps_timed: int = 10):
        self.budget_s = minutes * 60.0
        self.steps_per_epoch = steps_per_epoch
        self.val_batches = val_batches
        self.validations_per_epoch = validations_per_epoch
        self.steps_skipped = max(1, steps_skipped)  # the timer starts when a step ends: the first is never timed
        self.steps_timed = min(steps_timed, max(steps_per_epoch - steps_skipped, 1))
        # The first-epoch iteration after which the first plan is made (never, in an epoch this short or shorter).
        self.plan_iteration = self.steps_skipped - 1 + self.steps_timed
        self.started = time.perf_counter()
        self._timer_start = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def fit_after_step(self, iteration: int) -> int | None:
        """Call after every step of the first epoch; returns the planned steps once the timed steps are done."""
        if iteration == self.steps_skipped - 1:
            self._timer_start = time.perf_counter()
        if self._timer_start is None or iteration != self.plan_iteration:
            return None
        step_s = (time.perf_counter() - self._timer_start) / self.steps_timed
        validation_s = self.val_batches * step_s * EVAL_STEP_FRACTION * self.validations_per_epoch
        final_s = self.val_batches * step_s * EVAL_STEP_FRACTION  # the threshold choice: one inference pass
        steps = self._steps(iteration + 1, self.budget_s - self.elapsed() - final_s, step_s, validation_s)
        log.info("time budget %.3g min: %.2f s per training step, %.1f min of validation per epoch: %d steps "
                 "(%.1f epochs)", self.budget_s / 60, step_s, validation_s / 60, steps, steps / self.steps_per_epoch)
        return steps

    def fit_after_epoch(self, steps_done: int, train_s: float, validation_s: float) -> int:
        """Planned steps in all, from the first epoch's measured training and validation time."""
        final_s = validation_s / max(self.validations_per_epoch, 1)
        steps = self._steps(steps_done, self.budget_s - self.elapsed() - final_s, train_s / max(steps_done, 1),
                            validation_s)
        log.info("time budget %.3g min: the first epoch took %.1f min with validation: %d steps (%.1f epochs)",
                 self.budget_s / 60, (train_s + validation_s) / 60, steps, steps / self.steps_per_epoch)
        return steps

    def _steps(self, steps_done: int, seconds_left: float, step_s: float, validation_s: float) -> int:
        per_step = step_s + validation_s / max(self.steps_per_epoch, 1)
        return steps_done + max(0, int(seconds_left // max(per_step, 1e-9)))


class RecordedPlan(TimeBudget):
    """A --time-budget run's two plans, ``[first, final]`` as its model file records them (``budget_plan``),
    replayed instead of the clock: the same numbers at the same points of the first epoch, so the
    learning rate of every step, the epochs and the cut-short last epoch are the budget run's, and
    a CPU replay gives its weights bit for bit. *first* is None where the budget run's first epoch
    was too short to time steps in."""

    def __init__(self, plan, steps_per_epoch: int):
        super().__init__(0.0, steps_per_epoch, val_batches=0, validations_per_epoch=0)
        self.first, self.final = plan

    def fit_after_step(self, iteration: int) -> int | None:
        if iteration != self.plan_iteration or self.first is None:
            return None
        log.info("time budget: the recorded first plan, %d steps (%.1f epochs)", self.first,
                 self.first / self.steps_per_epoch)
        return self.first

    def fit_after_epoch(self, steps_done: int, train_s: float, validation_s: float) -> int:
        log.info("time budget: the recorded final plan, %d steps (%.1f epochs)", self.final,
                 self.final / self.steps_per_epoch)
        return self.final
