"""Training and inference loops for torchvision detection models.

- ``train_steps``: the training loop, a generator yielding after every optimizer
  step (its caller does what follows a step and ends an epoch early, nothing is
  called back); gradient clipping, mixed precision on CUDA only, a non-finite loss
  stops with :class:`NonFiniteLossError` naming the epoch, iteration and loss terms.
  ``train_one_epoch``: a whole pass of it.
- ``run_inference``: predictions in eval mode (what mAP must be measured on);
  ``run_proposals``: the first stage's region proposals alone.
- ``evaluate_loss``: the mean loss on a loader, computed correctly. torchvision's
  detection models return losses only in train mode, and train mode changes two
  things besides returning losses: BatchNorm layers would use (and update)
  batch statistics, and the RPN/RoI samplers draw random proposals. So the
  model is put in train mode with every BatchNorm module switched back to eval
  (running statistics, no updates; pretrained backbones use FrozenBatchNorm2d
  anyway), gradients are off, and the global RNG is forked and seeded so that
  the sampling is repeatable and does not disturb the training RNG stream. An image too thin for the
  model's transform (inference.too_thin) is left out of the mean.

The optimizer and its schedule are utils.detection.optim's, the checkpoint dict
utils.detection.checkpoint's and the device utils.detection.device's: this file holds only loops.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import nullcontext

import torch
from torch import nn

from .. import defaults as D
from ..errors import InputError
from ..stop import check_stop
from .inference import decode_bound, detect, model_input_at_size, rescaled_boxes, too_thin

LOSS_KEYS = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")


class NonFiniteLossError(InputError, RuntimeError):
    """The training loss became NaN or infinite."""


# ----------------------------------------------------------------------------- batches

def _plain_tensor(value):
    return value.as_subclass(torch.Tensor) if isinstance(value, torch.Tensor) else value


def to_device(images, targets, device):
    """Move a collated detection batch to *device*; tv_tensors become plain tensors."""
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{k: (_plain_tensor(v).to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                for k, v in t.items()} for t in targets]
    return images, targets


# ----------------------------------------------------------------------------- loops

def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def train_steps(model, optimizer, loader, device, epoch: int, scheduler=None, scaler=None,
                clip_grad: float | None = D.CLIP_GRAD, amp: bool = D.AMP, progress: bool = True,
                description: str = "train"):
    """One optimizer step per batch of *loader*, yielding after each step (values, totals): the step's loss and
    its terms with the learning rate it used ("lr"), and the epoch's totals, one dict filled in when the loop
    ends: mean losses per image, images, steps, seconds, images/s and the learning rate the next step would
    use (the clock is read twice per epoch, as a time budget's tests count readings).

    A generator, so that its caller runs what follows a step (weight EMA, a time budget's timing, TensorBoard)
    and ends the epoch early by leaving the loop and closing it (a time-budget plan cuts an epoch short; closed
    early, it draws the batch the next step would have had, see below): the loop calls nothing back.
    *scheduler* is stepped every iteration. Mixed precision is used on CUDA only (CPU autocast to bfloat16 is
    slower than float32 on most CPUs).
    """
    from tqdm import tqdm

    model.train()
    sums = {key: 0.0 for key in ("loss", *LOSS_KEYS)}
    totals, images_seen, steps = {}, 0, 0
    started = time.perf_counter()
    bar = tqdm(loader, desc=f"{description} epoch {epoch + 1}", unit="batch", disable=not progress,
               leave=False, dynamic_ncols=True)
    batches = enumerate(bar)
    try:
        for iteration, (images, targets) in batches:
            images, targets = to_device(images, targets, device)
            with _autocast(device, amp):
                loss_dict = model(images, targets)
            loss = sum(loss_dict.values())
            if not torch.isfinite(loss):
                terms = ", ".join(f"{k}={v.item():.4g}" for k, v in loss_dict.items())
                raise NonFiniteLossError(
                    f"non-finite training loss {loss.item()} at epoch {epoch + 1}, iteration {iteration + 1} "
                    f"({terms}); lower the learning rate (--lr) or check the annotations of this batch")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                if clip_grad:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                if clip_grad:
                    nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
                optimizer.step()
            step_lr = optimizer.param_groups[0]["lr"]
            if scheduler is not None:
                scheduler.step()
            values = {"loss": loss.item(), **{key: value.item() for key, value in loss_dict.items()}}
            images_seen += len(images)
            steps += 1
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value * len(images)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            yield {**values, "lr": step_lr}, totals
    except GeneratorExit:
        # Closed before the loader ended (the plan cut the epoch): draw the next batch and drop it, as the loop
        # always did, asking for the step limit only once it held the batch. On a CPU the loader runs in this
        # process and its augmentation draws from the global RNG, which the next epoch's sampling goes on from:
        # a --budget-plan recorded earlier replays to the same weights only with that draw.
        next(batches, None)
        raise
    finally:
        bar.close()
        seconds = time.perf_counter() - started
        totals.update({key: value / max(images_seen, 1) for key, value in sums.items()})
        totals.update(images=images_seen, steps=steps, seconds=seconds,
                      images_per_s=images_seen / seconds if seconds else 0.0, lr=optimizer.param_groups[0]["lr"])


def train_one_epoch(model, optimizer, loader, device, epoch: int, **options) -> dict:
    """A whole pass of :func:`train_steps` (*options* are its keywords); returns the epoch's totals."""
    steps = train_steps(model, optimizer, loader, device, epoch, **options)
    last = deque(steps, maxlen=1)  # run to the end: the totals dict is filled in once the loop has ended
    return last[0][1] if last else {}


def _set_batchnorm_eval(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


@torch.no_grad()
def evaluate_loss(model, loader, device, seed: int = 0, progress: bool = False) -> dict:
    """Mean detection loss per image on *loader*, without training anything (see the module docstring)."""
    from tqdm import tqdm

    was_training = model.training
    sums, images_seen = {}, 0
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model.train()
        _set_batchnorm_eval(model)
        for images, targets in tqdm(loader, desc="loss", unit="batch", disable=not progress, leave=False):
            # an image the transform would shrink to no pixel row fails the batch: left out, as inference gives it
            # no detections (a training run leaves out those its smallest training size would: too_thin_to_train)
            runnable = [i for i, image in enumerate(images) if not too_thin(model, *image.shape[-2:])]
            if not runnable:
                continue
            images, targets = to_device([images[i] for i in runnable], [targets[i] for i in runnable], device)
            loss_dict = model(images, targets)
            batch = len(images)
            images_seen += batch
            sums["loss"] = sums.get("loss", 0.0) + float(sum(loss_dict.values())) * batch
            for key, value in loss_dict.items():
                sums[key] = sums.get(key, 0.0) + float(value) * batch
    model.train(was_training)
    return {key: value / images_seen for key, value in sums.items()} if images_seen else {}


@torch.no_grad()
def run_inference(model, loader, device, progress: bool = False, description: str = "predict", tta: bool = False,
                  stop: str | None = None):
    """(predictions, targets) in original image coordinates, on the CPU, with the model in eval mode, each image's
    detections as predict makes them (utils.detection.inference.detect: images of one size per forward pass; with
    *tta* each image's plain and flipped passes fused). The model called on the loader's batch padded its images
    to the largest, so evaluate's figures, the validation choices and the rates stored for the estimators came
    from other detections than predict counts. A photo larger than the size the model uses is given to it reduced
    as predict's decode workers reduce it (inference.model_input_at_size), its boxes mapped back to its own pixels
    as predict maps them. With *stop* (what a stop abandons), a SIGTERM stops it before the next batch
    (utils.stop.check_stop)."""
    from tqdm import tqdm

    model.eval()
    bound = decode_bound(model)  # now: choose_inference_size changes the model's size between calls
    predictions, all_targets = [], []
    for images, targets in tqdm(loader, desc=description, unit="batch", disable=not progress, leave=False):
        if stop is not None:
            check_stop(stop)
        inputs = [model_input_at_size(model, image, bound, device) for image in images]
        outputs = detect(model, inputs, tta=tta)
        for output, given, image, target in zip(outputs, inputs, images, targets):
            output = {**output, "boxes": rescaled_boxes(output["boxes"], tuple(given.shape[-2:]),
                                                        tuple(image.shape[-2:]))}
            predictions.append({k: v.detach().cpu() for k, v in output.items()})
            all_targets.append({"boxes": _plain_tensor(target["boxes"]).cpu(), "labels": target["labels"].cpu()})
    return predictions, all_targets


@torch.no_grad()
def run_proposals(model, loader, device) -> tuple[list[torch.Tensor], list[dict]]:
    """(region proposals per image, targets), both in original image coordinates, on the CPU.

    The first stage alone (transform, backbone, RPN in eval mode): what the RoI heads get
    to classify, so the faces it misses no training of the second stage can find.
    """
    model.eval()
    proposals, all_targets = [], []
    for images, targets in loader:
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        batch, _ = model.transform([image.to(device) for image in images])
        boxes, _ = model.rpn(batch, model.backbone(batch.tensors))
        for found, resized, original, target in zip(boxes, batch.image_sizes, original_sizes, targets):
            scale = torch.tensor([original[1] / resized[1], original[0] / resized[0]] * 2, device=found.device)
            proposals.append((found * scale).cpu())
            all_targets.append({"boxes": _plain_tensor(target["boxes"]).cpu(), "labels": target["labels"].cpu()})
    return proposals, all_targets
