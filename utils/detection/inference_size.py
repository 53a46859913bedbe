"""The working size a trained model runs at, chosen on its validation images after training.

A detector here resizes every photo so that its longer side is the working size (``--image-size`` while
training). Faces in these photos are small, and a model trained at one size finds more of them, and
places their boxes better, when it runs at a larger one: on the real data's validation split the
60-minute 512 px model's mAP@0.5 went from 0.555 at 512 px to 0.643 at 800 px (bench/RESULTS.md).

``choose_inference_size`` tries ``defaults.INFERENCE_SCALES`` times the training size (at most
``INFERENCE_SIZE_MAX``) on the held-out validation images and keeps the smallest size whose fitness
(0.1 mAP@0.5 + 0.9 mAP, what the HPO maximises) is within ``INFERENCE_SIZE_TOLERANCE`` of the best:
a larger size costs time on every photo, so it has to earn it. bin/train.py stores the choice in the
model file; ``inference_size`` gives every job that loads the model (evaluate, predict, the service,
video) the size to run at, ``--image-size`` on those jobs overriding it.

At that size ``choose_tta`` then decides flip test-time augmentation the same way (kept only when it
earns its doubled time), and ``inference_tta`` gives the jobs the choice, ``--tta``/``--no-tta`` overriding
it. On the 60-minute model of bench/RESULTS.md it raised validation fitness by 0.015. ``choose_box_voting`` then
decides box voting (inference.VotingRoIHeads) by the same rule at that size and TTA, and ``inference_box_voting``
gives the jobs that choice, ``--box-voting``/``--no-box-voting`` overriding it.
"""

from __future__ import annotations

from .. import defaults as D

# torch (metrics, model) is imported where it is used: the workflow generator reads candidate_sizes and
# choice_passes to size the train job's time limit on a submit host that may have no torch.


def candidate_sizes(image_size: int, scales=D.INFERENCE_SCALES, largest: int = D.INFERENCE_SIZE_MAX) -> list[int]:
    """The working sizes tried for a model trained at *image_size*: multiples of 32 px, the training size
    itself always among them, none above *largest* (unless the training size is)."""
    sizes = {int(image_size)}
    for scale in scales:
        size = int(round(image_size * scale / 32)) * 32
        if 32 <= size <= largest:
            sizes.add(size)
    return sorted(sizes)


def choice_passes(image_size: int) -> float:
    """What choosing the working size, flip TTA and box voting after training costs, in inference passes over the
    validation images at the training size *image_size*: one pass per candidate size, each (size /
    image_size)^2 as dear, a pass with flip TTA (plain and flipped) at the chosen size, at most the
    largest, and one with box voting, with TTA at most. About 28 passes with the default scales up to a training
    size of 640 px; fewer above, where INFERENCE_SIZE_MAX caps the sizes tried (about 14 at 800 px)."""
    return sum((size / image_size) ** 2 for size in candidate_sizes(image_size)) + 4 * largest_size_cost(image_size)


def largest_size_cost(image_size: int) -> float:
    """What one plain inference pass at the largest working size tried for a model trained at *image_size* costs,
    in plain passes at the training size: 4 with the default scales up to a training size of 640 px, less above,
    where INFERENCE_SIZE_MAX caps the sizes tried. The jobs that run the trained model (evaluate, predict, video)
    are planned before its size is chosen, so their time limits count this much (utils/pegasus/runtimes.py)."""
    return max((size / image_size) ** 2 for size in candidate_sizes(image_size))


def set_inference_size(model, size: int) -> None:
    """Run *model* at working size *size*: its transform fits each image's longer side to it."""
    from .model import transform_sizes

    sizes = transform_sizes(size)
    model.transform.min_size = (sizes["min_size"],)
    model.transform.max_size = sizes["max_size"]


def working_size(model) -> int | None:
    """The working size *model* runs at now; None for one without a single size (an ensemble of model files,
    each member at its own)."""
    transform = getattr(model, "transform", None)
    return None if transform is None else int(transform.max_size)


def choose_inference_size(model, predict, image_size: int, candidates=None,
                          tolerance: float = D.INFERENCE_SIZE_TOLERANCE) -> tuple[dict, tuple]:
    """(the record stored in the model file, the (predictions, targets) at the chosen size).

    *predict* () -> (predictions, targets) runs *model* over the validation images; it is called once per
    candidate size, and *model* is left at the chosen size.
    """
    from .metrics import coco_map, fitness

    rows, predictions = [], {}
    for size in candidates or candidate_sizes(image_size):
        set_inference_size(model, size)
        predictions[size] = predict()
        summary = coco_map(*predictions[size])
        rows.append({"image_size": size, "fitness": fitness(summary), "map": summary["map"],
                     "map_50": summary["map_50"], "mar_100": summary["mar_100"]})
    defined = [row for row in rows if row["fitness"] is not None]
    if not defined:  # no labelled face among the validation images: nothing to choose by
        chosen, criterion = image_size, "the training size: the validation images hold no labelled face"
    else:
        best = max(row["fitness"] for row in defined)
        chosen = min(row["image_size"] for row in defined if row["fitness"] >= best - tolerance)
        criterion = (f"the smallest size with fitness (0.1 mAP@0.5 + 0.9 mAP) within {tolerance:g} of the best, "
                     f"of {len(rows)} from {rows[0]['image_size']} to {rows[-1]['image_size']} px")
    set_inference_size(model, chosen)
    record = {"image_size": chosen, "chosen_on": "validation", "criterion": criterion,
              "images": len(predictions[chosen][1]), "candidates": rows}
    return record, predictions[chosen]


def choose_tta(plain: tuple, flipped: tuple, tolerance: float = D.INFERENCE_SIZE_TOLERANCE) -> tuple[dict, tuple]:
    """(the record's TTA fields, the (predictions, targets) of the choice): flip TTA (each image also run
    flipped left-right, the two passes' boxes fused, twice the time) is kept when its fitness on the
    validation images, *flipped* (predictions, targets), beats the plain pass's, *plain*, by more than
    *tolerance*, the rule the working size is chosen by."""
    chosen, fitness_plain, fitness_flip = _beats(flipped, plain, tolerance)
    record = {"tta": chosen, "tta_fitness": {"plain": fitness_plain, "flip": fitness_flip},
              "tta_criterion": f"flip TTA when its fitness beats the plain pass's by more than {tolerance:g}"}
    return record, (flipped if chosen else plain)


def choose_box_voting(plain: tuple, voted: tuple, vote_iou: float = D.BOX_VOTE_IOU,
                      tolerance: float = D.INFERENCE_SIZE_TOLERANCE) -> tuple[dict, tuple]:
    """(the record's box voting fields, the (predictions, targets) of the choice): box voting at *vote_iou* is kept
    when its fitness on the validation images, *voted*, beats the pass without, *plain*, by more than *tolerance*.
    It costs little time; the margin keeps a choice that the validation images cannot tell apart off."""
    chosen, fitness_plain, fitness_voted = _beats(voted, plain, tolerance)
    record = {"box_voting": chosen, "box_vote_iou": vote_iou,
              "box_voting_fitness": {"plain": fitness_plain, "voted": fitness_voted},
              "box_voting_criterion": f"box voting at IoU {vote_iou:g} when its fitness beats NMS alone by more "
                                      f"than {tolerance:g}"}
    return record, (voted if chosen else plain)


def _beats(other: tuple, plain: tuple, tolerance: float) -> tuple[bool, float | None, float | None]:
    """(whether *other*'s fitness beats *plain*'s by more than *tolerance*, plain's fitness, other's), each
    (predictions, targets) on the validation images; a fitness is None where they hold no labelled face."""
    from .metrics import coco_map, fitness

    fitness_plain, fitness_other = fitness(coco_map(*plain)), fitness(coco_map(*other))
    chosen = fitness_plain is not None and fitness_other is not None and fitness_other > fitness_plain + tolerance
    return chosen, fitness_plain, fitness_other


def inference_tta(model_meta: dict, given: bool | None) -> tuple[bool, str]:
    """(flip TTA or not, where it comes from) for a job running a model: the flag when given, else the choice
    made on validation and stored in the model file, else none."""
    if given is not None:
        return bool(given), "--tta" if given else "--no-tta"
    stored = (model_meta.get("inference_size") or {}).get("tta")
    if stored is not None:
        return bool(stored), "the model's, chosen on its validation images"
    return False, "none: the model file holds no choice (trained before 2026-12-05, or without validation images)"


def inference_box_voting(model_meta: dict, given: bool | None) -> tuple[float | None, str]:
    """(the IoU boxes vote at, None for none; where it comes from) for a job running a model: the flag when given
    (at the IoU the model file stores, else D.BOX_VOTE_IOU), else the choice made on validation, else none."""
    stored = model_meta.get("inference_size") or {}
    vote_iou = stored.get("box_vote_iou") or D.BOX_VOTE_IOU
    if given is not None:
        return (vote_iou if given else None), "--box-voting" if given else "--no-box-voting"
    if stored.get("box_voting") is not None:
        return (vote_iou if stored["box_voting"] else None), "the model's, chosen on its validation images"
    return None, "none: the model file holds no choice (trained before 2026-12-07, or without validation images)"


def inference_size(model_meta: dict, given: int | None) -> tuple[int, str]:
    """(working size, where it comes from) for a job running a model: the flag when given, else the size
    chosen on validation and stored in the model file, else the size it was trained at."""
    if given is not None:
        return int(given), "--image-size"
    stored = model_meta.get("inference_size") or {}
    if stored.get("image_size") is not None and stored.get("chosen_on"):
        return int(stored["image_size"]), f"the model's, chosen on its {stored['chosen_on']} images"
    return int(model_meta["image_size"]), "the size it was trained at: the model file holds no chosen size"
