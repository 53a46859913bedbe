"""The three mask classes and their detection labels.

Label 0 is reserved for background: torchvision's detection models treat label 0
as "no object", so a real class must never get it (the predecessor's bug).
"""

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
