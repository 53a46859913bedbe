"""The device a job runs on: --device auto, cpu or cuda, refused in one line when it is not here."""

from __future__ import annotations

import torch

from ..errors import InputError


class DeviceError(InputError, RuntimeError):
    """The --device asked for is unknown or not available here."""


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for but no CUDA device is available")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise DeviceError(f"unknown device {name!r}: use auto, cpu or cuda")
    if name.startswith("cuda:"):
        index = name.partition(":")[2]
        count = torch.cuda.device_count()
        if not index.isdigit() or int(index) >= count:
            raise DeviceError(f"--device {name}: no such CUDA device here ({count} available"
                              + (f": cuda:0 to cuda:{count - 1})" if count else ")"))
    return torch.device(name)
