"""Staged training: a run as a list of stages, each with its own epochs, learning rate and trainable layers.

Staged fine-tuning (e.g. stage 1: backbone frozen, 3 epochs, lr 0.02; stage 2: all layers, 10 epochs,
lr 0.005) is given to bin/train.py as ``--stages SPEC`` and to workflow.py through its config. SPEC is a
list of mappings, as a Python list (from YAML), a JSON text, or a path to a .json/.yml/.yaml file::

    [{"epochs": 3, "lr": 0.02, "trainable_layers": 0, "name": "head"},
     {"epochs": 10, "lr": 0.005, "trainable_layers": 5}]

Keys per stage: ``epochs`` (int >= 1, required), ``lr`` (float > 0; default: the run's lr),
``trainable_layers`` (backbone stages trained from the top: 0 = whole backbone frozen, at most 6 for
mobilenet_v2_fpn and 5 for the resnets; default: the run's trainable layers) and ``name``.
Each stage gets a fresh warm-up + cosine schedule of its own length and a new optimizer over the
parameters it trains (utils.detection.training.Trainer, following a training_plan.TrainingPlan).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .. import safe_yaml
from ..errors import InputError, shown

# The most backbone stages any of our backbones has (mobilenet_v2_fpn: 6, the resnets: 5); the backbone's
# own limit is checked before training (training_plan.make_plan, model.BACKBONE_STAGES).
MAX_TRAINABLE_LAYERS = 6
STAGE_KEYS = ("epochs", "lr", "trainable_layers", "name")
STAGE_FILE_SUFFIXES = (".json", ".yml", ".yaml")


class StagesError(InputError):
    """A malformed --stages specification (one line: where, the stage number and the key)."""


@dataclass(frozen=True)
class Stage:
    """One stage of training; None means "the run's value" (--lr / --trainable-layers / params file)."""

    epochs: int
    lr: float | None = None
    trainable_layers: int | None = None
    name: str = ""

    def label(self, number: int) -> str:
        """'stage 2 (finetune)' or 'stage 2': how the log names it (*number* counts from 1)."""
        return f"stage {number} ({self.name})" if self.name else f"stage {number}"

    def to_dict(self) -> dict:
        """The keys that are set (None and an empty name left out): canonical for JSON and records."""
        values = {"epochs": self.epochs, "lr": self.lr, "trainable_layers": self.trainable_layers,
                  "name": self.name or None}
        return {key: value for key, value in values.items() if value is not None}


def _read_spec_file(path: Path, where: str):
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StagesError(f"{where}: stages file {path} not found") from None
    except (OSError, UnicodeDecodeError) as problem:
        raise StagesError(f"{where}: cannot read stages file {path} ({problem})") from None
    try:
        return json.loads(text) if path.suffix.lower() == ".json" else safe_yaml.load(text)
    # Recursion: JSON nested too deep; ValueError: besides JSONDecodeError, an integer over 4300 digits
    except (ValueError, yaml.YAMLError, RecursionError) as problem:
        detail = " ".join(str(problem).split())
        raise StagesError(f"{where}: stages file {path} does not parse ({detail})") from None


def _load_spec(value, where: str) -> tuple[object, str]:
    """(the list the spec holds, where to say it came from)."""
    if isinstance(value, Path) or (isinstance(value, str) and value.strip().lower().endswith(STAGE_FILE_SUFFIXES)
                                   and not value.lstrip().startswith(("[", "{"))):
        path = Path(value)
        return _read_spec_file(path, where), f"{where} ({path})"
    if isinstance(value, str):
        try:
            return json.loads(value), where
        except (ValueError, RecursionError) as problem:  # ValueError: JSONDecodeError, or an int over 4300 digits
            raise StagesError(f"{where}: neither a .json/.yml/.yaml file nor a JSON list of stages "
                              f"({problem})") from None
    return value, where


def _number(value) -> float | None:
    """*value* as a float when it is a number; PyYAML reads '1e-3' (no dot) as text, so numeric text counts."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _parse_stage(entry, number: int, where: str) -> Stage:
    at = f"{where}: stage {number}"
    if isinstance(entry, Stage):
        entry = entry.to_dict()
    if not isinstance(entry, dict):
        raise StagesError(f"{at}: expected a mapping of {', '.join(STAGE_KEYS)}, got {type(entry).__name__}")
    unknown = sorted(str(key) for key in entry if key not in STAGE_KEYS)
    if unknown:
        raise StagesError(f"{at}: unknown key {shown(unknown[0])} (known: {', '.join(STAGE_KEYS)})")
    if "epochs" not in entry:
        raise StagesError(f"{at}: key 'epochs' is required")
    epochs = entry["epochs"]
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise StagesError(f"{at}: key 'epochs' must be an integer >= 1, got {shown(epochs)}")
    lr = entry.get("lr")
    if lr is not None:
        number_lr = _number(lr)
        if number_lr is None or not math.isfinite(number_lr) or number_lr <= 0:
            raise StagesError(f"{at}: key 'lr' must be a number > 0, got {shown(lr)}")
        lr = number_lr
    layers = entry.get("trainable_layers")
    if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int)
                               or not 0 <= layers <= MAX_TRAINABLE_LAYERS):
        raise StagesError(f"{at}: key 'trainable_layers' must be an integer 0..{MAX_TRAINABLE_LAYERS} "
                          f"(0 freezes the whole backbone), got {shown(layers)}")
    name = entry.get("name")
    if name is None:
        name = ""
    elif not isinstance(name, str):
        raise StagesError(f"{at}: key 'name' must be text, got {shown(name)}")
    return Stage(epochs=epochs, lr=lr, trainable_layers=layers, name=name.strip())


def parse_stages(value, where: str = "--stages") -> list[Stage]:
    """The stages of *value*: a list of mappings (from YAML), a JSON text of one, or a .json/.yml/.yaml path.

    Raises StagesError (one line naming *where*, the stage number and the key) for an empty list,
    unknown keys, missing epochs and values of the wrong type or out of range.
    """
    spec, where = _load_spec(value, where)
    if isinstance(spec, (list, tuple)):
        stages = [_parse_stage(entry, number, where) for number, entry in enumerate(spec, start=1)]
    else:
        raise StagesError(f"{where}: expected a list of stages, got {type(spec).__name__}")
    if not stages:
        raise StagesError(f"{where}: the list of stages is empty; give at least one stage (epochs: N)")
    return stages


def stages_to_json(stages) -> str:
    """Compact, canonical JSON of *stages* (sorted keys, unset keys left out); parse_stages reads it back."""
    return json.dumps([stage.to_dict() for stage in stages], separators=(",", ":"), sort_keys=True)


def total_epochs(stages) -> int:
    return sum(stage.epochs for stage in stages)


def stage_at(stages, epoch: int) -> tuple[int, int]:
    """(index of the stage, epochs of it already done) for the run's 0-based *epoch*; past the end: the last."""
    start = 0
    for index, stage in enumerate(stages):
        if epoch < start + stage.epochs:
            return index, epoch - start
        start += stage.epochs
    return len(stages) - 1, stages[-1].epochs


def scale_stages(stages, epochs: int) -> list[Stage]:
    """*stages* with their epochs scaled to *epochs* in all, in proportion (every stage keeps at least one).

    The largest-remainder rounding keeps the total exact; with fewer epochs than stages each stage keeps one.
    """
    stages = list(stages)
    epochs = max(int(epochs), len(stages))
    total = total_epochs(stages)
    shares = [stage.epochs * epochs / total for stage in stages]
    counts = [max(1, math.floor(share)) for share in shares]
    # Hand out (or take back) the rounding difference by the largest (smallest) remainders.
    order = sorted(range(len(stages)), key=lambda i: shares[i] - math.floor(shares[i]), reverse=True)
    while sum(counts) < epochs:
        for i in order:
            if sum(counts) == epochs:
                break
            counts[i] += 1
    while sum(counts) > epochs:
        shrinkable = [i for i in reversed(order) if counts[i] > 1]
        counts[max(shrinkable, key=lambda i: counts[i])] -= 1
    return [Stage(epochs=count, lr=stage.lr, trainable_layers=stage.trainable_layers, name=stage.name)
            for stage, count in zip(stages, counts)]
