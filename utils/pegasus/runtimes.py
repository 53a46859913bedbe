"""Each job's time limits, computed from its workload: the Pegasus ``runtime`` profile and, for the
jobs that checkpoint (hpo, train, predict), ``checkpoint.time`` and ``maxwalltime``.

On a pool pegasus-kickstart stops hpo, train and predict at checkpoint.time (``-k``); the others get ``-k 0``
(never: checked with plan-check.sh --details) and their ``runtime`` reaches HTCondor as ``pegasus_job_runtime``,
for a pool's policy; the local executor stops them at it. A retry of a job stopped for its size dies the same
way, so a limit must come from the work:

    work     = images x seconds per image (x epochs x trials), at 512 px, scaled by (size / 512)^2
               (x largest_size_cost x passes for the jobs that run the trained model: evaluate, predict, video;
               a video's frames / stride, plus the decoding of every frame)
    runtime  = STARTUP_S + SAFETY x work               (at least MIN_RUNTIME_S)
    train with --time-budget M:  runtime = STARTUP_S + BUDGET_SLACK x M min + SAFETY x (the choice passes)
    checkpoint.time = runtime in minutes; maxwalltime = checkpoint.time + GRACE_MIN

A train job ends by choosing its working size, flip TTA, box voting and score threshold on the validation
images (utils/detection/inference_size.py): about 28 inference passes over them at a training size up to 640 px
(fewer above, where the largest sizes tried are capped at 1280 px), which
the train limits count (``_choice_s``); on a large validation split they outlast the epochs' own.
The jobs after it run at whatever was chosen, which the plan cannot know: their limits count the dearest
choice, the largest size tried (``largest_size_cost``: 4 times the pixels up to a training size of 640 px),
with flip TTA (``MODEL_PASSES``), since a limit too short kills every retry the same way and one too long only
reports a hung job late.
So a healthy job never meets its own limit. Where a pool caps a job's wall time, sites.yml's
``max_job_minutes`` of the site caps both: at checkpoint.time the job gets SIGTERM, keeps its
checkpoint and is retried from it, so a long training (or a large shard's prediction) runs in pieces (a retry
each, on top of dagman.retry: checkpoint_limits).
``runtimes: {train: 36000, ...}`` (seconds) in a site's sites.yml entry overrides any kind.
"""

from __future__ import annotations

import logging
import math
import posixpath

from ..detection.inference_size import choice_passes, largest_size_cost
from ..errors import shown
from .config import ConfigError, trials_per_worker

# Seconds per image at 512 px on one node: a training step (forward and backward) and an inference
# (bench/train_step.py and bench/predict.py: ~1.2 and ~1.2 images/s on 2 CPU cores), and the data jobs'
# decode-transform-encode. GPU figures are for a modest card (a T4); faster cards only finish earlier.
SECONDS_PER_IMAGE = {
    "cpu": {"train": 0.85, "infer": 0.85, "data": 0.1},
    "gpu": {"train": 0.1, "infer": 0.05, "data": 0.1},
}
# predict_video reads (decodes) every frame of a video, the --video-stride ones only are run through the model:
# 2.4 ms a 1080p frame, 9.2 ms a 4K one (OpenCV's read() on 2 shared CPU cores, measured on 2026-12-06). A long 4K
# video at a large stride spends longer decoding than on the model, and was stopped at a limit that counted the model
VIDEO_DECODE_S_PER_FRAME = 0.01
MERGE_S_PER_IMAGE = 1e-4  # reading one image's detections and writing its rows (merge_predictions)
# merge_predictions bootstraps the headline figure of every folder the images sit in (1000 replicates, each an
# NNLS solve for the adjusted estimators), whatever the folder's size: 0.13-0.17 s a folder on 2 loaded CPU cores
# before 11b7097 took every replicate's rates at once, 0.011-0.019 s after it (synthetic predictions, measured on
# 2026-12-06). The limit keeps the older figure: a limit too long reports a hung job late, one too short kills
# every retry of a healthy one (100k images in 10k folders: ~3 minutes of work, a limit of ~75 minutes)
MERGE_S_PER_FOLDER = 0.15
SAFETY = 3.0          # slower or shared nodes, the first steps' allocations, validation passes
STARTUP_S = 180       # image pull or start, Python and torch imports, staging, kickstart
MIN_RUNTIME_S = 300
BUDGET_SLACK = 1.25   # a --time-budget run overshoots by up to one step and the model's writing
RARE_SHARE = 0.2      # images holding the rare class: 11 % of the real data; the augment job copies them
GRACE_MIN = 5         # minutes from checkpoint.time's SIGTERM to maxwalltime's kill
CHECKPOINTING = ("hpo", "train", "predict")  # predict: its progress file, as one .tar (bin/predict.py --checkpoint)
# Passes per image at the working size chosen after training, for the jobs that run the trained model: flip TTA
# runs each image twice, and evaluate adds its test-loss pass (utils/detection/evaluation.evaluate_model).
# A --fold-ensemble predict or predict_video job runs each of the K fold models once instead (_predict_passes).
MODEL_PASSES = {"evaluate": 3, "evaluate_fold": 3, "predict": 2, "predict_video": 2}

log = logging.getLogger(__name__)


class RuntimeConfigError(ConfigError):
    """A runtimes / max_job_minutes entry of sites.yml cannot be used."""


def _rates(config) -> tuple[float, float, float]:
    """Seconds per image of (data work, a training step, an inference) for this device and image size."""
    speed = SECONDS_PER_IMAGE["gpu" if config.gpus > 0 else "cpu"]
    scale = (config.image_size / 512) ** 2
    return speed["data"], speed["train"] * scale, speed["infer"] * scale


def _sized_s(config) -> float:
    """Seconds of one plain inference pass per image at the largest working size the trained model may choose."""
    return _rates(config)[2] * largest_size_cost(config.image_size)


def _predict_passes(config, kind: str = "predict") -> int:
    """Passes per image (a video's: per processed frame) of a predict or predict_video job: the final model's, or
    with --fold-ensemble one per fold model (the workflow gives the ensemble no --tta)."""
    return config.folds if getattr(config, "fold_ensemble", False) else MODEL_PASSES[kind]


def _choice_s(config) -> dict[str, float]:
    """Seconds of the working size, flip TTA, voting and threshold choice that ends a train job, per job kind: over the
    val images, and for a fold (--folds K) over the other K-1 folds' share of them."""
    val = sum(1 for entry in config.entries if entry.split == "val")
    seconds = val * _rates(config)[2] * choice_passes(config.image_size)
    folds = getattr(config, "folds", 0)  # 0 for a stand-in config without the field (test_runtimes)
    return {"train": seconds, **({"train_fold": seconds * (folds - 1) / folds} if folds else {})}


def _figures_per_folder(config) -> int:
    """How many folders merge_predictions gives a figure of: the folders the prediction images sit in, from the
    shards' index.csv (each image's path below the set), none for one folder; without an index, as many as the
    images (each may sit in its own folder). The rows are counted as they are read: the folders are held, not the
    images' rows (a million of them held ~330 MB in the generator)."""
    from ..data.shards import index_csv_rows
    from ..errors import InputError

    try:  # a set's shards share one folder and index
        folders = len({posixpath.dirname(row.get("name") or "")
                       for row in index_csv_rows(config.pred_shards[0].path.parent)})
    except InputError:
        return sum(shard.images for shard in config.pred_shards)
    return folders if folders > 1 else 0


def _train_epochs(config) -> int:
    """Epochs of a train job: the stages' total with --train-stages (WorkflowConfig.train_epochs), else epochs
    (a stand-in config without the property, test_runtimes, has no stages)."""
    return getattr(config, "train_epochs", config.epochs)


def workloads(config) -> dict[str, float]:
    """Seconds of work per job kind (one job of it), before the safety factor."""
    counts = {split: sum(1 for entry in config.entries if entry.split == split) for split in ("train", "val", "test")}
    data_s, train_s, infer_s = _rates(config)
    trained = counts["train"] * (1 + config.augment_copies + config.rare_factor * RARE_SHARE)
    epoch_s = trained * train_s + counts["val"] * infer_s
    trials = max(trials_per_worker(config.trials, config.hpo_jobs))
    choice, sized_s = _choice_s(config), _sized_s(config)
    return {
        "plot_class_distribution": len(config.entries) * data_s,
        "preprocess": max(counts["val"], counts["test"]) * data_s,
        "augment": trained * data_s,
        "hpo": trials * config.hpo_epochs * epoch_s,
        "hpo_merge": 0.0,
        "train": _train_epochs(config) * (epoch_s + counts["val"] * infer_s) + choice["train"],
        "evaluate": counts["test"] * sized_s * MODEL_PASSES["evaluate"],
        "predict": max(shard.images for shard in config.pred_shards) * sized_s * _predict_passes(config),
        "merge_predictions": (sum(shard.images for shard in config.pred_shards) * MERGE_S_PER_IMAGE
                              + _figures_per_folder(config) * MERGE_S_PER_FOLDER),
        "predict_video": (max((video.frames for video in config.pred_videos), default=0)
                          * (VIDEO_DECODE_S_PER_FRAME
                             + sized_s * _predict_passes(config, "predict_video") / config.video_stride)),
        "report": 0.0,  # reads the outputs and downscales at most 24 images: the startup allowance covers it
        "make_fold": (trained + counts["val"]) * data_s,
        "aggregate_folds": 0.0,
        **_fold_workloads(config, counts, trained, train_s, infer_s, choice, sized_s),
    }


def _fold_workloads(config, counts, trained, train_s, infer_s, choice, sized_s) -> dict[str, float]:
    """With --folds K: a fold trains on the train split's images (with their augmented copies) of the
    other K-1 folds, validates on their val-split images, and is evaluated on the held-out 1/K of the
    train+val pool. The fold jobs reuse the train and evaluate transformations; their job-level
    profiles carry these figures."""
    folds = getattr(config, "folds", 0)  # 0 for a stand-in config without the field (test_runtimes)
    if not folds:
        return {}
    held_out = (counts["train"] + counts["val"]) / folds
    fold_trained = trained * (folds - 1) / folds
    fold_val = counts["val"] * (folds - 1) / folds
    return {
        "train_fold": (_train_epochs(config) * (fold_trained * train_s + 2 * fold_val * infer_s)
                       + choice["train_fold"]),
        "evaluate_fold": held_out * sized_s * MODEL_PASSES["evaluate_fold"],
    }


def job_runtimes(config) -> dict[str, int]:
    """The runtime profile (seconds) of every job kind: from the workload, or the site's override."""
    work = workloads(config)
    runtimes = {kind: max(MIN_RUNTIME_S, math.ceil(STARTUP_S + SAFETY * seconds)) for kind, seconds in work.items()}
    if config.time_budget is not None:
        choice = _choice_s(config)
        for kind in ("train", "train_fold"):
            if kind in runtimes:
                runtimes[kind] = max(MIN_RUNTIME_S, math.ceil(STARTUP_S + BUDGET_SLACK * config.time_budget * 60
                                                              + SAFETY * choice[kind]))
        # A staged run keeps at least one whole epoch per stage (utils.detection.stages.scale_stages), which a
        # short budget does not cover: the limit must, or every try dies at the same point.
        stages = len(getattr(config, "train_stages", None) or [])
        for kind in ("train", "train_fold"):
            if stages and kind in runtimes:
                per_epoch = (work[kind] - choice[kind]) / max(1, _train_epochs(config))
                runtimes[kind] = max(runtimes[kind],
                                     math.ceil(STARTUP_S + SAFETY * (stages * per_epoch + choice[kind])))
    site = config.execution_site_config()
    # a stand-in config (test_runtimes) has no sites_file or site_where()
    where = config.site_where() if hasattr(config, "site_where") else "sites.yml"
    check_site_limits(site, job_kinds(), where)
    runtimes.update(site.get("runtimes") or {})
    for line in over_site_cap(config, runtimes) + trial_over_piece(config, work["hpo"]):
        log.warning(line)
    return runtimes


def trial_over_piece(config, hpo_s: float) -> list[str]:
    """A warning where one HPO trial may outlast a piece under sites.yml's max_job_minutes (*hpo_s*: a worker's
    work): a trial is not checkpointed, so one stopped at checkpoint.time starts again from scratch on the next
    try, and after MAX_REQUEUES another takes its place, as long: no trial ever finishes, and the job burns every
    retry its pieces give it (checkpoint_limits) before it fails."""
    cap = config.execution_site_config().get("max_job_minutes")
    trials = max(trials_per_worker(config.trials, config.hpo_jobs))
    if not isinstance(cap, int) or cap <= GRACE_MIN or not trials:
        return []
    trial_s, piece_s = SAFETY * hpo_s / trials, (cap - GRACE_MIN) * 60 - STARTUP_S
    if trial_s <= piece_s:
        return []
    return [f"hpo: a trial may run up to {math.ceil(trial_s / 60)} minutes, longer than a piece of the site's "
            f"max_job_minutes {cap} ({cap - GRACE_MIN} minutes, its start included); a trial stopped at a piece's end "
            "starts again from scratch, so none would finish: lower --hpo-epochs, or raise max_job_minutes"]


def over_site_cap(config, runtimes: dict[str, int]) -> list[str]:
    """A warning per job of the workflow that keeps no checkpoint and whose limit passes sites.yml's
    max_job_minutes: the site stops such a job at its cap on every retry, where hpo, train and predict resume in
    pieces. A video line names the --video-stride that fits (its limit counts the dearest working size and TTA,
    so the real time is often far below it); a kind whose limit is a sites.yml ``runtimes:`` entry, evaluate, or a
    data job can only be given a higher cap."""
    cap = config.execution_site_config().get("max_job_minutes")
    if not isinstance(cap, int) or cap <= GRACE_MIN:  # checkpoint_minutes refuses it in one line
        return []
    overridden = config.execution_site_config().get("runtimes") or {}
    absent = {"predict_video"} if not config.pred_videos else set()
    if not getattr(config, "folds", 0):  # workloads() sizes make_fold whether or not the workflow has folds
        absent |= {"make_fold", "evaluate_fold"}
    usable_s = cap * 60 - STARTUP_S  # above 0: a cap above GRACE_MIN minutes leaves more than STARTUP_S
    lines = []
    for kind, seconds in runtimes.items():
        if kind in CHECKPOINTING or kind == "train_fold" or kind in absent or seconds <= cap * 60:
            continue
        line = (f"{kind}: a job may run up to {math.ceil(seconds / 60)} minutes (its time limit), above the "
                f"site's max_job_minutes {cap}, which would stop it on every retry")
        if kind in overridden:
            line += f": lower {getattr(config, 'sites_file', 'sites.yml')}'s runtimes: {kind}, or raise max_job_minutes"
        elif kind == "predict_video":
            frames = max(video.frames for video in config.pred_videos)
            per_frame = SAFETY * _sized_s(config) * _predict_passes(config, "predict_video")
            left_s = usable_s - SAFETY * frames * VIDEO_DECODE_S_PER_FRAME  # every frame is decoded, at any stride
            line += (f": give --video-stride {math.ceil(frames * per_frame / left_s)} or more" if left_s > 0 else
                     ": reading its frames alone takes longer; raise max_job_minutes")
        else:
            line += ": raise max_job_minutes"
        lines.append(line)
    return lines


def job_kinds() -> list[str]:
    """The job kinds a sites.yml ``runtimes:`` entry may name: those workloads() sizes. The fold kinds are
    among them with or without --folds, so that one sites.yml serves runs with and without folds (an entry
    for a kind the run does not build is not used)."""
    from .catalogs import JOB_SCRIPTS

    return [*JOB_SCRIPTS, "train_fold", "evaluate_fold"]


def _whole_positive(value) -> bool:
    """An int above 0 that is not a bool (YAML's true is an int to Python)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_site_limits(site: dict, kinds: list[str], where: str) -> None:
    """A sites.yml site entry's ``runtimes:`` (job kind -> seconds; *kinds*: the kinds it may name) and
    ``max_job_minutes``; RuntimeConfigError naming *where* (the file and the site)."""
    overrides = site.get("runtimes")
    if overrides is not None and not isinstance(overrides, dict):
        raise RuntimeConfigError(f"{where}: runtimes: {shown(overrides)} is not a mapping of job kind -> seconds "
                                 "(e.g. {train: 36000})")
    for kind, seconds in (overrides or {}).items():
        if kind not in kinds:
            raise RuntimeConfigError(f"{where}: runtimes: unknown job kind {shown(kind)} (one of {', '.join(kinds)})")
        if not _whole_positive(seconds):
            raise RuntimeConfigError(f"{where}: runtimes: {kind}: {shown(seconds)} is not a positive number "
                                     "of seconds")
    _check_cap(site.get("max_job_minutes"), where)


def _check_cap(max_job_minutes, where: str) -> None:
    if max_job_minutes is not None and not (_whole_positive(max_job_minutes) and max_job_minutes > GRACE_MIN):
        raise RuntimeConfigError(f"{where}: max_job_minutes {shown(max_job_minutes)} must be a whole number of "
                                 f"minutes above {GRACE_MIN}")


def checkpoint_limits(job, runtime_s: int, max_job_minutes: int | None, properties) -> None:
    """A checkpointing job's checkpoint.time and maxwalltime (checkpoint_minutes). Under a site's cap it runs in
    pieces, a try each, that DAGMan counts as failures: its retries (a dagman profile) are the *properties*'
    dagman.retry plus the pieces after the first, or a long training failed for good when the retries ran out."""
    checkpoint_time, max_walltime = checkpoint_minutes(runtime_s, max_job_minutes)
    job.add_pegasus_profile(checkpoint_time=checkpoint_time, max_walltime=max_walltime)
    pieces = math.ceil(runtime_s / 60 / checkpoint_time)
    if pieces > 1:
        try:
            retries = int(properties["dagman.retry"])
        except KeyError:  # not set: DAGMan and the local executor retry no job
            retries = 0
        job.add_dagman_profile(retry=retries + pieces - 1)


def checkpoint_minutes(runtime_s: int, max_job_minutes: int | None = None) -> tuple[int, int]:
    """(checkpoint.time, maxwalltime) in minutes for a checkpointing job of *runtime_s* seconds."""
    checkpoint_time = math.ceil(runtime_s / 60)
    if max_job_minutes is not None:
        _check_cap(max_job_minutes, "sites.yml")  # checked with the file's name when it was read
        checkpoint_time = min(checkpoint_time, max_job_minutes - GRACE_MIN)
    return checkpoint_time, checkpoint_time + GRACE_MIN
