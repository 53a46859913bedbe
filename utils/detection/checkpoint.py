"""Seeding, and the checkpoint: one dict of the training state written atomically after every epoch.

RNG states are stored as tensors and lists, so that ``torch.load(weights_only=True)`` reads the whole file
(no pickle of arbitrary objects); a resumed run restores them and draws the same batches and samples.
"""

from __future__ import annotations

import errno
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path
from ..errors import InputError, library_problem
from ..stop import is_stand_in


class CheckpointError(InputError, RuntimeError):
    """A checkpoint cannot be read or does not fit the run."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
    return save_torch_file(path, payload)


def save_torch_file(path, payload) -> Path:
    """torch.save *payload* to *path* atomically (the checkpoint, the model file). A write that fails (a full
    disk) is an OSError naming the file: torch reports it as a RuntimeError ('unexpected pos 704 vs 598')."""
    try:
        # through an open file: torch.save names the archive's entries after a path's stem (the temporary file's
        # random name), so the same weights gave files of other bytes; an open file's entries are "archive/..."
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            torch.save(payload, handle)
    except RuntimeError as error:
        if "unexpected pos" not in str(error) and "failed writing" not in str(error):
            raise
        raise OSError(errno.EIO, f"cannot write {Path(path).name} (the write failed: a full disk?); the file there, "
                                 "if any, is as it was", str(path)) from None
    return Path(path)


# The checkpoint's entries and the types a resume reads them as (None: absent or null is allowed).
CHECKPOINT_TYPES = {"model": dict, "optimizer": dict, "scheduler": (dict, type(None)), "epoch": int, "args": dict,
                    "rng": dict, "history": (list, type(None)), "extra": (dict, type(None))}


def torch_file_problem(path, error: BaseException) -> str:
    """What torch.load(*path*) raising *error* says of the file, for a one-line message (library_problem's words).
    A file cut short past its first few KB (a copy stopped part way) gets from torch's zip reader only "OSError:
    [Errno 22] Invalid argument": said as what it is, the zip directory torch.save writes at the end being gone."""
    if isinstance(error, OSError) and not isinstance(error, PermissionError) and not zipfile.is_zipfile(path):
        return ("truncated or damaged: no zip directory at its end, where torch.save writes one; "
                f"{library_problem(error)}")
    return library_problem(error)


def load_checkpoint(path) -> dict:
    """The checkpoint at *path*, each entry of the type a resume reads; else one CheckpointError line."""
    if is_stand_in(path):
        raise CheckpointError(f"{path}: a stand-in, not a checkpoint (a stopped job's note); delete it to start "
                              "afresh")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, not a torch file, or a pickle weights_only refuses
        raise CheckpointError(f"{path}: not a readable checkpoint ({torch_file_problem(path, error)}); "
                              "delete it to start afresh") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(payload).__name__}, not train's dict of "
                              "the training state); delete it to start afresh")
    missing = [k for k in ("model", "optimizer", "scheduler", "epoch", "args", "rng") if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    for key, kind in CHECKPOINT_TYPES.items():
        if key in payload and (not isinstance(payload[key], kind) or isinstance(payload[key], bool)):
            raise CheckpointError(f"{path}: checkpoint's {key} is a {type(payload[key]).__name__}, not what train "
                                  "writes; delete it to start afresh")
    from .model_file import non_finite_weights  # model_file imports this module

    ema = (payload.get("extra") or {}).get("ema")  # the averaged weights validation and the model file use
    weights = {**payload["model"], **({f"(EMA) {name}": value for name, value in ema.items()}
                                      if isinstance(ema, dict) else {})}
    if problem := non_finite_weights(weights):  # resumed, it would stop at its first step's NaN loss
        raise CheckpointError(f"{path}: {problem}: the training diverged before it was written; delete it to "
                              "start afresh (with a lower --lr)")
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
