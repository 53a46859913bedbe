"""The three mask classes, their detection labels, and label maps from other data sets' names.

Label 0 is reserved for background: torchvision's detection models treat label 0
as "no object", so a real class must never get it (the predecessor's bug).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import InputError

CLASSES = ("with_mask", "without_mask", "mask_weared_incorrect")
BACKGROUND = "background"
LABEL_OF = {BACKGROUND: 0, "with_mask": 1, "without_mask": 2, "mask_weared_incorrect": 3}
NAME_OF = {label: name for name, label in LABEL_OF.items()}
NUM_CLASSES = len(LABEL_OF)  # background + 3, what torchvision's predictors expect
RARE_CLASS = "mask_weared_incorrect"
# One colour per class for plots and annotated images (RGB).
CLASS_COLOURS = {
    "with_mask": (46, 160, 67),
    "without_mask": (214, 39, 40),
    "mask_weared_incorrect": (255, 160, 0),
}


class LabelMapError(InputError):
    """A --label-map value that cannot be used; str() names the flag and the bad pair."""


@dataclass(frozen=True)
class LabelMap:
    """Other data sets' class names -> this project's CLASSES, e.g. ``with_incorrect_mask=mask_weared_incorrect``.

    Parsed once (``LabelMap.parse``, the text of --label-map) and applied in one place,
    utils.data.voc.parse_voc, where XML object names become classes, so every job that reads
    XML agrees. A source may not itself be one of CLASSES: applying the map to XML already
    written with canonical names then changes nothing, so a workflow can hand the same flag
    to every job that reads XML.
    """

    pairs: tuple[tuple[str, str], ...] = ()  # (source name, class), in the order given
    _class_of: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_class_of", dict(self.pairs))

    @classmethod
    def parse(cls, text: str | None, flag: str = "--label-map") -> LabelMap:
        """The map of ``SOURCE=CLASS,SOURCE=CLASS``; empty text gives the empty map. Raises LabelMapError."""
        pairs, seen = [], set()
        text = (text or "").strip()
        for item in text.split(",") if text else ():
            if not item.strip():
                raise LabelMapError(f"{flag}: {text!r} has an empty pair (a stray comma)")
            source, sep, target = (part.strip() for part in item.partition("="))
            if not sep or "=" in target:
                raise LabelMapError(f"{flag}: {item.strip()!r} is not a SOURCE=CLASS pair")
            if not source:
                raise LabelMapError(f"{flag}: {item.strip()!r} has an empty source name")
            if target not in CLASSES:
                raise LabelMapError(f"{flag}: {item.strip()!r} maps to {target!r}, which is not one of "
                                    f"{', '.join(CLASSES)}")
            if source in CLASSES:
                raise LabelMapError(f"{flag}: {item.strip()!r} renames {source!r}, which is already a class")
            if source in seen:
                raise LabelMapError(f"{flag}: {item.strip()!r} maps {source!r} a second time")
            seen.add(source)
            pairs.append((source, target))
        return cls(tuple(pairs))

    def class_name(self, name: str) -> str:
        """The class an XML object name stands for: its mapped class, else the name itself."""
        return self._class_of.get(name, name)

    def as_dict(self) -> dict[str, str]:
        return dict(self.pairs)

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def __str__(self) -> str:
        """The --label-map text that gives this map back ("" for no map)."""
        return ",".join(f"{source}={target}" for source, target in self.pairs)


NO_LABEL_MAP = LabelMap()
