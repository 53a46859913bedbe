"""Several trained detectors used as one: boxes merged across models with weighted box fusion.

:class:`BoxFusionEnsemble` is called like a torchvision detection model in eval mode (a list
of float CxHxW images in, one dict of boxes, labels and scores per image out, in the image's
pixel coordinates), so utils.detection.inference and the predict job use it unchanged. Each
member runs on every image; the members' boxes are fused per class with weighted box fusion
(utils.detection.inference.fuse_boxes): boxes of one face from different models are averaged,
weighted by score, instead of one being kept and the rest dropped as NMS does. With flip TTA
every member also sees the image flipped left-right, and those passes join the fusion as
further members (``detect_with_flips``, which inference.detect calls when TTA is asked for).

Scores: ``conf_type="avg"`` gives a fused box the mean score of its cluster, scaled down when
fewer members found it, so a face found by one model in K scores about 1/K of its score.
The operating threshold of the ensemble is the mean of the members' own thresholds (each
chosen on its validation images) unless one is given.
"""

from __future__ import annotations

import torch

from .. import defaults as D
from ..errors import InputError
from .evaluation import load_trained_model
from .inference import fuse_boxes, max_detections, unflip_boxes


class EnsembleError(InputError):
    """The models cannot be used together; str() names the file."""


class BoxFusionEnsemble:
    """Detectors whose boxes are fused with weighted box fusion; called like one detection model."""

    def __init__(self, models, iou_threshold: float = D.WBF_IOU, skip_score: float = 0.0):
        self.models = list(models)
        if not self.models:
            raise EnsembleError("an ensemble needs at least one model")
        self.iou_threshold = iou_threshold
        self.skip_score = skip_score  # each member already drops boxes under its own score floor
        self.max_detections = max(max_detections(model) for model in self.models)

    def eval(self) -> "BoxFusionEnsemble":
        for model in self.models:
            model.eval()
        return self

    def to(self, device) -> "BoxFusionEnsemble":
        self.models = [model.to(device) for model in self.models]
        return self

    @torch.inference_mode()
    def __call__(self, images: list[torch.Tensor]) -> list[dict]:
        return self._fused(images, flips=False)

    @torch.inference_mode()
    def detect_with_flips(self, images: list[torch.Tensor]) -> list[dict]:
        """Like calling the ensemble, with each image also run flipped: 2K members' boxes fused."""
        return self._fused(images, flips=True)

    def _fused(self, images: list[torch.Tensor], flips: bool) -> list[dict]:
        if not images:
            return []
        batch = list(images) + ([torch.flip(image, dims=[-1]) for image in images] if flips else [])
        per_model = [model(batch) for model in self.models]
        results = []
        for i, image in enumerate(images):
            height, width = int(image.shape[-2]), int(image.shape[-1])
            members = [outputs[i] for outputs in per_model]
            if flips:
                members += [{**outputs[len(images) + i],
                             "boxes": unflip_boxes(outputs[len(images) + i]["boxes"], width)} for outputs in per_model]
            results.append(self._fuse(members, width, height, image.device))
        return results

    def _fuse(self, members: list[dict], width: int, height: int, device) -> dict:
        return fuse_boxes(members, width, height, device, self.max_detections, self.iou_threshold, self.skip_score)


def load_ensemble(paths, device, score_threshold: float | None = None, working_size: int | None = None,
                  box_voting: bool | None = None):
    """(ensemble, meta, score threshold, where it comes from) for the model files *paths*: each loaded
    and checked as a single model is (ModelError naming the file), each at *working_size* when given, else
    at its own, with box voting as *box_voting* says, else as it chose; the threshold given, else the mean of the
    members' own."""
    models, metas, thresholds = [], [], []
    for path in paths:
        model, meta, threshold, _ = load_trained_model(path, device, None, working_size, box_voting=box_voting)
        models.append(model)
        metas.append(meta)
        thresholds.append(threshold)
    if score_threshold is not None:
        threshold, source = score_threshold, "--score-threshold"
    else:
        threshold = round(sum(thresholds) / len(thresholds), 4)
        source = (f"the mean of the {len(paths)} models' own thresholds "
                  f"({', '.join(f'{t:g}' for t in thresholds)})")

    def common(key):
        values = {str(meta.get(key)) for meta in metas}
        return metas[0].get(key) if len(values) == 1 else "mixed: " + ", ".join(str(m.get(key)) for m in metas)

    meta = {"ensemble": "weighted box fusion", "models": [str(p) for p in paths], "backbone": common("backbone"),
            "image_size": common("image_size"), "working_size": common("working_size"),
            "working_size_source": common("working_size_source"), "box_voting": common("box_voting"),
            "box_vote_iou": common("box_vote_iou"), "box_voting_source": common("box_voting_source"),
            "member_thresholds": thresholds}
    return BoxFusionEnsemble(models).eval(), meta, threshold, source


def load_models(paths, device, score_threshold: float | None = None, working_size: int | None = None,
                tta: bool | None = None, box_voting: bool | None = None):
    """(model, meta, score threshold, where it comes from) for a job given one model file or several (the fold
    models of --fold-ensemble): one as load_trained_model loads it, several as one ensemble (load_ensemble), so that
    predict and predict_video run the same models the same way. meta["tta"] and meta["tta_source"] say whether flip
    TTA runs: *tta* (--tta / --no-tta) when given, else a single model's choice on validation; an ensemble makes
    no choice of its own, so it runs without. meta["box_voting"] and meta["box_voting_source"] likewise for box voting,
    which each member of an ensemble makes as it chose unless *box_voting* is given."""
    if len(paths) == 1:
        return load_trained_model(paths[0], device, score_threshold, working_size, tta, box_voting)
    model, meta, threshold, source = load_ensemble(paths, device, score_threshold, working_size, box_voting)
    tta_source = {True: "--tta", False: "--no-tta", None: "an ensemble makes no choice of its own"}[tta]
    return model, {**meta, "tta": bool(tta), "tta_source": tta_source}, threshold, source


def box_voting_said(meta: dict) -> str:
    """How a job's boxes vote, for its first lines: 'box voting on (why)', 'box voting off (why)', or, for an
    ensemble whose members chose differently on their own validation images, 'box voting per member (on, off)
    (why)': its meta["box_voting"] is then load_ensemble's 'mixed: True, False', which is not 'on'."""
    voting = meta["box_voting"]
    if isinstance(voting, bool):
        state = "on" if voting else "off"
    else:
        state = f"per member ({str(voting).removeprefix('mixed: ').replace('True', 'on').replace('False', 'off')})"
    return f"box voting {state} ({meta['box_voting_source']})"
