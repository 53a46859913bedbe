"""Training and inference loops for torchvision detection models.

- ``train_one_epoch``: gradient clipping, mixed precision on CUDA only, a
  non-finite loss stops with :class:`NonFiniteLossError` naming the epoch,
  iteration and loss terms.
- ``run_inference``: predictions in eval mode (what mAP must be measured on);
  ``run_proposals``: the first stage's region proposals alone.
- ``evaluate_loss``: the mean loss on a loader, computed correctly. torchvision's
  detection models return losses only in train mode, and train mode changes two
  things besides returning losses: BatchNorm layers would use (and update)
  batch statistics, and the RPN/RoI samplers draw random proposals. So the
  model is put in train mode with every BatchNorm module switched back to eval
  (running statistics, no updates; pretrained backbones use FrozenBatchNorm2d
  anyway), gradients are off, and the global RNG is forked and seeded so that
  the sampling is repeatable and does not disturb the training RNG stream.
- optimizer / scheduler builders, checkpoints with RNG states stored as
  tensors and lists (``torch.load(weights_only=True)`` reads them), seeding.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_path
from ..errors import InputError

LOSS_KEYS = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")


class NonFiniteLossError(InputError, RuntimeError):
    """The training loss became NaN or infinite."""


class CheckpointError(InputError, RuntimeError):
    """A checkpoint cannot be read or does not fit the run."""


class DeviceError(InputError, RuntimeError):
    """The --device asked for is unknown or not available here."""


# ----------------------------------------------------------------------------- devices, seeds, batches

def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for but no CUDA device is available")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise DeviceError(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _plain_tensor(value):
    return value.as_subclass(torch.Tensor) if isinstance(value, torch.Tensor) else value


def to_device(images, targets, device):
    """Move a collated detection batch to *device*; tv_tensors become plain tensors."""
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{k: (_plain_tensor(v).to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                for k, v in t.items()} for t in targets]
    return images, targets


# ----------------------------------------------------------------------------- optimizer and schedule

def build_optimizer(model: nn.Module, name: str = "sgd", lr: float = 0.01, momentum: float = 0.9,
                    weight_decay: float = 1e-4) -> torch.optim.Optimizer:
    """SGD with momentum, or AdamW, over every parameter that may train.

    Parameters frozen only for the first epochs of a two-stage schedule are
    included: they get no gradient while frozen, and both optimizers skip
    parameters without one. Biases and normalisation weights get no decay.
    """
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        (decay if parameter.ndim > 1 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        # momentum plays beta1 so that one search space serves both optimizers
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
    raise InputError(f"unknown optimizer {name!r}: use sgd or adamw")


def lr_factor(iteration: int, total_iters: int, warmup_iters: int, schedule: str = "cosine",
              warmup_factor: float = 0.001, steps=(0.67, 0.89), gamma: float = 0.1,
              min_factor: float = 0.01) -> float:
    """Multiplier of the base learning rate at *iteration* (0-based): linear warm-up, then cosine or steps."""
    warmup_iters = min(warmup_iters, max(total_iters - 1, 0))
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        return warmup_factor * (1 - alpha) + alpha
    if schedule == "cosine":
        span = max(total_iters - warmup_iters, 1)
        progress = min((iteration - warmup_iters) / span, 1.0)
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "step":
        passed = sum(iteration >= int(step * total_iters) for step in steps)
        return gamma ** passed
    raise InputError(f"unknown learning-rate schedule {schedule!r}: use cosine or step")


class LrSchedule:
    """The learning-rate factor per iteration, as a callable object so that LambdaLR's state_dict keeps its
    fields (plain numbers) and ``total_iters`` can be changed mid-run: a --time-budget run sets the
    schedule's length only after timing its first steps."""

    def __init__(self, total_iters: int, warmup_iters: int = 100, schedule: str = "cosine",
                 steps=(0.67, 0.89), gamma: float = 0.1):
        lr_factor(0, total_iters, warmup_iters, schedule)  # validates the schedule name now
        self.total_iters = int(total_iters)
        self.warmup_iters = int(warmup_iters)
        self.schedule = schedule
        self.steps = list(steps)
        self.gamma = float(gamma)

    def __call__(self, iteration: int) -> float:
        return lr_factor(iteration, self.total_iters, self.warmup_iters, self.schedule, steps=self.steps,
                         gamma=self.gamma)


def build_scheduler(optimizer, total_iters: int, warmup_iters: int = 100, schedule: str = "cosine",
                    steps=(0.67, 0.89), gamma: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration LambdaLR over an :class:`LrSchedule` (its length changed by set_schedule_length)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LrSchedule(total_iters, warmup_iters, schedule,
                                                                   steps=steps, gamma=gamma))


def set_schedule_length(scheduler: torch.optim.lr_scheduler.LambdaLR, total_iters: int) -> None:
    """Give *scheduler*'s :class:`LrSchedule` a new length, through LambdaLR's own state_dict (which holds the
    schedule's fields): the iterations already run keep their rates, and so does the next one, whose rate
    the last ``step()`` has already set. A time budget's plan changes the length mid-run."""
    state = scheduler.state_dict()
    for schedule in state["lr_lambdas"]:  # one per parameter group, all the same LrSchedule
        schedule["total_iters"] = int(total_iters)
    scheduler.load_state_dict(state)


# ----------------------------------------------------------------------------- loops

def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def make_grad_scaler(device: torch.device, amp: bool):
    return torch.amp.GradScaler("cuda") if amp and device.type == "cuda" else None


def train_one_epoch(model, optimizer, loader, device, epoch: int, scheduler=None, scaler=None,
                    clip_grad: float | None = 10.0, amp: bool = True, progress: bool = True,
                    description: str = "train", after_step=None, max_iterations=None) -> dict:
    """One pass over *loader*; returns mean losses per image, images, seconds and images/s.

    *scheduler* is stepped every iteration. Mixed precision is used on CUDA only
    (CPU autocast to bfloat16 is slower than float32 on most CPUs). *after_step(iteration, values)*,
    when given, runs after every optimizer step (weight EMA, timing for a time budget, TensorBoard);
    *values* holds the step's loss, its loss terms and the learning rate the step used ("lr").
    *max_iterations*, a callable, is asked before every step how many steps this epoch may
    take (None: all); a time-budget plan cuts the last epoch short, and may change mid-epoch.
    """
    from tqdm import tqdm

    model.train()
    sums = {key: 0.0 for key in ("loss", *LOSS_KEYS)}
    images_seen = 0
    started = time.perf_counter()
    bar = tqdm(loader, desc=f"{description} epoch {epoch + 1}", unit="batch", disable=not progress,
               leave=False, dynamic_ncols=True)
    steps = 0
    for iteration, (images, targets) in enumerate(bar):
        limit = max_iterations() if max_iterations is not None else None
        if limit is not None and iteration >= limit:
            break
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
        if after_step is not None:
            after_step(iteration, {**values, "lr": step_lr})
        batch = len(images)
        steps += 1
        images_seen += batch
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value * batch
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    seconds = time.perf_counter() - started
    result = {key: value / max(images_seen, 1) for key, value in sums.items()}
    result.update(images=images_seen, steps=steps, seconds=seconds,
                  images_per_s=images_seen / seconds if seconds else 0.0, lr=optimizer.param_groups[0]["lr"])
    return result


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
            images, targets = to_device(images, targets, device)
            loss_dict = model(images, targets)
            batch = len(images)
            images_seen += batch
            sums["loss"] = sums.get("loss", 0.0) + float(sum(loss_dict.values())) * batch
            for key, value in loss_dict.items():
                sums[key] = sums.get(key, 0.0) + float(value) * batch
    model.train(was_training)
    return {key: value / images_seen for key, value in sums.items()} if images_seen else {}


@torch.no_grad()
def run_inference(model, loader, device, progress: bool = False, description: str = "predict"):
    """(predictions, targets) in original image coordinates, on the CPU, with the model in eval mode."""
    from tqdm import tqdm

    model.eval()
    predictions, all_targets = [], []
    for images, targets in tqdm(loader, desc=description, unit="batch", disable=not progress, leave=False):
        outputs = model([image.to(device, non_blocking=True) for image in images])
        for output, target in zip(outputs, targets):
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


# ----------------------------------------------------------------------------- checkpoints

def rng_state() -> dict:
    """Python, NumPy, torch and CUDA RNG states as lists and tensors (weights_only-loadable)."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": [version, list(internal), gauss],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, model, optimizer, scheduler, epoch: int, args: dict, scaler=None,
                    history=None, extra=None) -> Path:
    """Write the training state after *epoch* completed epochs, atomically."""
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": int(epoch),
        "args": args,
        "rng": rng_state(),
        "history": list(history or []),
        "extra": extra or {},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error}); "
                              "delete it to start afresh") from None
    missing = [k for k in ("model", "optimizer", "scheduler", "epoch", "args", "rng") if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return payload


def restore_checkpoint(payload: dict, model, optimizer, scheduler=None, scaler=None, path="checkpoint") -> int:
    """Load a checkpoint's states into the given objects; returns the number of completed epochs."""
    try:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise CheckpointError(f"{path}: does not fit this model/optimizer ({first_line}); "
                              "was it written with another --backbone or --optimizer?") from None
    if scheduler is not None and payload.get("scheduler") is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if scaler is not None and payload.get("scaler") is not None:
        scaler.load_state_dict(payload["scaler"])
    set_rng_state(payload["rng"])
    return int(payload["epoch"])
