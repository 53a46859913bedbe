"""The steps of the train job (bin/train.py), one call each: settings, data, resume, epochs, the working size
and threshold chosen on validation, outputs.

``resolve_training`` turns the flags, with what bin/train.py read of them before torch's import (the label map,
the --params and --stages files), into the settings: the device, the parameters and the one training plan
(training_plan.make_plan, every exclusion checked there), before the data is read or anything written;
``train_epochs`` trains to the plan, writing the checkpoint, the metrics CSV and the loss plot after every epoch,
and returns the record.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import defaults as D
from ..atomic import atomic_path, write_text
from ..classes import LabelMap
from ..cli import print_skipped, print_values
from ..provenance import file_sha256, files_named, write_run_record
from .compliance import choose_operating_threshold
from .inference import set_box_voting
from .inference_size import choose_box_voting, choose_inference_size, choose_tta
from .quantify import calibration_record
from .recipe import too_thin_to_train
from .model_file import save_model_file
from .tensorboard_log import TrainBoard, pack_events
from ..data.pairs import object_problems, object_problems_line, open_pairs, pairs_sha256
from .device import resolve_device
from .params import TrainParams, describe, gpu_recipe, resolve_params
from .training import Trainer, TrainingDataError, TrainingRecord
from .training_plan import TrainingPlan, make_plan

log = logging.getLogger("train")


@dataclass(frozen=True)
class TrainingSettings:
    """Everything the flags resolve to, before anything is read or written."""

    params: TrainParams
    plan: TrainingPlan
    device: torch.device
    label_map: LabelMap


def resolve_training(args, params_file: dict, stages: list | None, label_map: LabelMap) -> TrainingSettings:
    """The settings of the flags: a flag wins over the --params file (*params_file*, read with *stages* by
    params.check_training_inputs before torch's import, as bin/train.py parsed *label_map*), which wins over the
    defaults; on CUDA the GPU recipe fills what neither set; the plan checks the schedule's flags. Logs the
    recipe and prints the parameters as the plan sets them."""
    device = resolve_device(args.device)
    params = resolve_params({**vars(args), "stages": stages}, params_file)
    given = {key for key, value in vars(args).items() if value is not None} | set(params_file)
    params, changes = gpu_recipe(params, given, device)
    for change in changes:
        log.info("GPU recipe: %s", change)
    log.info("recipe: %s", describe(params))
    plan = make_plan(params)
    values = {**params.to_dict(), **plan.as_record()}
    print_values("train", "params", values)
    return TrainingSettings(params, plan, device, label_map)


@dataclass(frozen=True)
class TrainingData:
    train_pairs: list
    val_pairs: list
    skipped: list[dict]
    input_files: list
    inputs_sha256: str
    object_problems: list[dict]  # objects dropped or clipped ([{file, problem}], pairs.object_problems)
    files_sha256: dict  # every input file's sha256 by path, read once (pairs_sha256): the run record's too


@contextlib.contextmanager
def open_training_data(args, settings: TrainingSettings, listed_in=None):
    """The usable training (and held-out validation) pairs of the flags; --val-mode merge trains on both. The
    skipped inputs go to stderr as print_skipped says, *listed_in* the output that lists them all (the run record)."""
    with contextlib.ExitStack() as stack:
        train_pairs, skipped = stack.enter_context(open_pairs(args.images, args.annotations))
        train_pairs, thin = too_thin_to_train(train_pairs, settings.params)
        skipped += thin
        val_pairs = []
        if args.val_images:
            val_pairs, val_skipped = stack.enter_context(open_pairs(args.val_images, args.val_annotations))
            val_pairs, thin = too_thin_to_train(val_pairs, settings.params)
            skipped += val_skipped + thin
        if args.val_mode == "merge":
            train_pairs, val_pairs = train_pairs + val_pairs, []
        # a job that fails for want of data writes no record: then every one is named here
        print_skipped(skipped, listed_in if train_pairs else None, reason_key="problem")
        if not train_pairs:
            raise TrainingDataError(f"{args.images}: no usable image/annotation pairs ({len(skipped)} skipped)")
        input_files = [p for pair in train_pairs + val_pairs for p in (pair.image, pair.annotation)]
        problems = object_problems(train_pairs + val_pairs, LabelMap.parse(getattr(args, "label_map", None)))
        if problems:
            log.warning(object_problems_line(problems))
        data_sha256, files_sha256 = pairs_sha256(train_pairs, val_pairs)
        data = TrainingData(train_pairs, val_pairs, skipped, input_files, data_sha256, problems, files_sha256)
        log.info("training on %d images%s (%d skipped), device %s", len(train_pairs),
                 f", monitoring {len(val_pairs)} validation images" if val_pairs else "", len(skipped),
                 settings.device)
        yield data


def resume_and_watch(trainer: Trainer, checkpoint: Path, args, stack: contextlib.ExitStack,
                     inputs_sha256: str | None = None) -> dict | None:
    """Resume from *checkpoint* when it holds a run (an empty file, as Pegasus stages the initial one, does
    not) for these inputs (*inputs_sha256*), then open the TensorBoard events when asked for. Returns what it
    resumed from, for the run record (the checkpoint, its sha256 and the epochs it held), or None."""
    resumed = None
    if checkpoint.is_file() and checkpoint.stat().st_size > 0:
        sha256 = file_sha256(checkpoint)  # before the run writes it anew
        done = trainer.resume(checkpoint, inputs_sha256, {"val_mode": getattr(args, "val_mode", None)})
        log.info("resumed from %s after epoch %d of %d", checkpoint, done, trainer.plan.epochs)
        resumed = {"checkpoint": str(checkpoint), "sha256": sha256, "after_epoch": done}
    if trainer.plan.staged:
        log.info("stages: %s", trainer.describe_stages())
    if not args.tensorboard_dir:
        return resumed
    # purge_step: what an interrupted try logged past its checkpoint (or, for a fresh run, an earlier run
    # in the same folder) is dropped; the events of the checkpoint's last epoch are at steps_taken
    trainer.board = TrainBoard(args.tensorboard_dir, purge_step=trainer.steps_taken + 1, every=args.tensorboard_every)
    stack.callback(trainer.board.close)
    if trainer.history and trainer.board.was_empty:  # resumed in a fresh folder (a pool job's retry)
        # each epoch's row holds the step it ended at; a checkpoint's from before rows did: the plan's (a step
        # limit cuts the last epoch short, its events at the limit)
        replayed = trainer.board.replay_history(
            trainer.history, lambda epochs: trainer.plan.steps_done(epochs, trainer.steps_per_epoch))
        log.info("TensorBoard: %s held no events; wrote the %d epoch(s) of the checkpoint's history",
                 args.tensorboard_dir, replayed)
    log.info("TensorBoard events in %s", args.tensorboard_dir)
    return resumed


def epoch_line(row, plan: TrainingPlan) -> str:
    stage = f" [{plan.stages[row.stage - 1].label(row.stage)}]" if plan.staged else ""
    line = (f"epoch {row.epoch}/{plan.epochs}{stage}: loss {row.train_loss:.4f}, lr {row.lr:.2e}, "
            f"{row.images_per_s:.2f} images/s")
    if row.val_loss is not None:
        line += f", val loss {row.val_loss:.4f}"
    if row.val_map is not None:
        line += f", val mAP {row.val_map:.4f}, mAP@0.5 {row.val_map_50:.4f}"
    return line


def train_epochs(trainer: Trainer, paths: dict, checkpoint_args: dict, validate_map: bool) -> TrainingRecord:
    """Train to the plan; after every epoch the checkpoint, the metrics CSV and the loss plot are written. Then
    the kept epoch's weights (--keep) are loaded for the model file."""
    while not trainer.finished:
        row = trainer.run_epoch(validate_map=validate_map)
        trainer.checkpoint(paths["checkpoint"], checkpoint_args)
        write_metrics_csv(paths["metrics_csv"], trainer.history)
        plot_loss_curve(paths["loss_plot"], trainer.history)
        log.info(epoch_line(row, trainer.plan))
    if not trainer.history:
        raise TrainingDataError(f"{paths['checkpoint']}: holds no training history; delete it and rerun")
    write_metrics_csv(paths["metrics_csv"], trainer.history)  # also on a rerun that had nothing left to train
    plot_loss_curve(paths["loss_plot"], trainer.history)
    kept = trainer.load_kept_weights()
    if kept["epoch"] != kept["last_epoch"]:
        log.info("keeping epoch %d's weights: the best validation fitness, %.4f (the last epoch, %d, had %.4f)",
                 kept["epoch"], kept["val_fitness"], kept["last_epoch"], kept["last_val_fitness"])
    else:
        log.info("keeping the last epoch's weights (%s)", kept.get("note") or (
            f"--keep {kept['rule']}" if kept["rule"] == "last" else "it had the best validation fitness"))
    return trainer.record()


def choose_on_validation(trainer: Trainer, has_val: bool) -> tuple[dict | None, dict, dict | None]:
    """(the working size the model runs at and whether with flip TTA and box voting, the score threshold predict and
    evaluate use it at, the validation record of the adjusted compliance estimators), each chosen on the held-out
    validation images when there are some (--val-mode monitor); else no size (the training size stands, no
    TTA), the default threshold, said so, and no record. The threshold is chosen at the chosen size, TTA and voting."""
    if not has_val:
        return None, {"score_threshold": D.SCORE_THRESHOLD, "chosen_on": None,
                      "criterion": "the default: no held-out validation images (--val-mode merge or no "
                                   "--val-images)"}, None
    log.info("Choosing the working size, test-time augmentation and box voting on the validation images")
    # About 28 validation passes (inference_size.choice_passes) before the model file exists: a SIGTERM stops them
    # at the next batch, so the job exits with its stand-ins before a pool's kill; the retry resumes after the
    # last epoch and makes the choices again (inference in eval mode: the same choices)
    stop = (f"the choice of working size, flip TTA, box voting and score threshold abandoned; the checkpoint holds "
            f"all {trainer.completed_epochs} epochs, a retry makes only the choice")
    predict = functools.partial(trainer.validation_predictions, stop=stop)  # (tta=False) -> (preds, targets)
    size, (preds, targets) = choose_inference_size(trainer.eval_model, predict, trainer.params.image_size)
    log.info("working size %d px: %s (%s)", size["image_size"], ", ".join(
        f"{row['image_size']} px mAP@0.5 {row['map_50']:.3f}" for row in size["candidates"]
        if row["map_50"] is not None), size["criterion"])
    tta_choice, (preds, targets) = choose_tta((preds, targets), predict(tta=True))
    size = {**size, **tta_choice}  # stored with the size: all three say how the model runs
    log.info("flip TTA %s: fitness %s plain, %s flipped (%s)", "on" if size["tta"] else "off",
             *(f"{value:.4f}" if value is not None else "undefined" for value in size["tta_fitness"].values()),
             size["tta_criterion"])
    set_box_voting(trainer.eval_model, D.BOX_VOTE_IOU)
    voting, (preds, targets) = choose_box_voting((preds, targets), predict(tta=size["tta"]))
    set_box_voting(trainer.eval_model, D.BOX_VOTE_IOU if voting["box_voting"] else None)  # the threshold's choice too
    size = {**size, **voting}
    log.info("box voting %s: fitness %s without, %s with (%s)", "on" if size["box_voting"] else "off",
             *(f"{value:.4f}" if value is not None else "undefined" for value in voting["box_voting_fitness"].values()),
             voting["box_voting_criterion"])
    if not any(len(target["labels"]) for target in targets):
        # F1 is 0 and the compliance error undefined at every threshold: the lowest (0.05) won, and predict and
        # evaluate counted every faint box as a face
        log.info("score threshold: the default, %.2f: the validation images hold no labelled face", D.SCORE_THRESHOLD)
        return size, {"score_threshold": D.SCORE_THRESHOLD, "chosen_on": None,
                      "criterion": "the default: the validation images hold no labelled face"}, None
    log.info("Choosing the operating threshold on the validation images")
    choice = choose_operating_threshold(preds, targets)
    log.info("score threshold %.2f: F1 %.3f, compliance error %s points on %d validation images (%s)",
             choice["score_threshold"], choice["f1"], choice["compliance_error_points"], choice["images"],
             choice["criterion"])
    # Per validation image, at the chosen threshold: what the adjusted estimators correct new counts with, kept per
    # image so that an interval can resample these images too (utils/detection/quantify.py).
    return (size, {**choice, "chosen_on": "validation"},
            calibration_record(preds, targets, choice["score_threshold"], tta=size["tta"],
                               working_size=size["image_size"]))


def write_model_outputs(trainer: Trainer, record: TrainingRecord, data: TrainingData, args, paths: dict,
                        settings: TrainingSettings, resumed: dict | None = None) -> float:
    """The model file (the kept epoch's weights, EMA when kept, the operating threshold, the parameters as trained), the
    packed TensorBoard events and the run record (with *resumed*: resume_and_watch's); returns the final loss."""
    size, operating, calibration = choose_on_validation(trainer, bool(data.val_pairs))
    trained = trainer.params.to_dict()  # the plan as trained: a budget's fitted epochs, stages and steps
    final_loss = record.history[-1]["train_loss"]
    # data_label_map: {object name in the data's XML: class} the data was read with ({}: names were the
    # classes); meta's "label_map" is another thing, class -> label number, set by the model file.
    meta = {"training": trained, "data_label_map": settings.label_map.as_dict(),
            "epochs_completed": trainer.completed_epochs, "num_train_images": len(data.train_pairs),
            "num_val_images": len(data.val_pairs), "val_mode": args.val_mode if args.val_images else None,
            "skipped_inputs": len(data.skipped), "inputs_sha256": data.inputs_sha256, "final_train_loss": final_loss,
            # training.workers is as asked (-1: per machine); each loader worker draws its own images' augmentation
            "loader_workers": trainer.train_workers}
    if args.params:
        meta["params_file"] = str(args.params)
    if size is not None:
        meta["inference_size"] = size
    meta["kept_weights"] = record.kept
    meta["operating_threshold"] = operating
    if calibration is not None:
        meta["quantification"] = calibration
    if record.plan.staged:
        # training.stages holds the stages trained (a --time-budget run's fitted ones); these as asked for
        meta["stages_requested"] = record.plan.requested_record()
    save_model_file(paths["output"], trainer.eval_model, meta)
    if trainer.board is not None:
        trainer.board.close()
        if args.tensorboard_tar:
            pack_events(args.tensorboard_dir, args.tensorboard_tar)
            log.info("TensorBoard events packed into %s", args.tensorboard_tar)
    # the starting weights' file as build_model loaded and hashed it: not one --weights none set aside, nor read again
    report = trainer.model.weights_report
    weights = {Path(report.source): report.sha256} if report.sha256 else {}
    summary = {"output": str(paths["output"]), "epochs": trainer.completed_epochs, "final_train_loss": final_loss,
               "kept_epoch": record.kept["epoch"],
               "working_size": size["image_size"] if size is not None else trainer.params.image_size,
               "weights": trainer.model.weights_report.message,
               "stages": trainer.describe_stages() if record.plan.staged else None}
    write_run_record(paths["run_record"], "train", {**vars(args), "resolved": trained, "device": str(settings.device),
                                                    "summary": summary, "skipped": data.skipped,
                                                    "object_problems": data.object_problems, "resumed_from": resumed},
                     [*data.input_files, *files_named(args.params), *weights], {**data.files_sha256, **weights})
    return final_loss


def write_metrics_csv(path, history: list[dict]) -> None:
    if not history:
        return
    columns = list(dict.fromkeys(key for row in history for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    write_text(path, buffer.getvalue())


def plot_loss_curve(path, history: list[dict], title: str = "Training loss") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(epochs, [row["train_loss"] for row in history], marker="o", label="train loss")
    for key in ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"):
        ax.plot(epochs, [row.get(key) for row in history], linestyle=":", linewidth=1, label=key)
    val = [(row["epoch"], row["val_loss"]) for row in history if row.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), marker="s", label="validation loss")
    frozen = [row["epoch"] for row in history if row.get("backbone_frozen")]
    if frozen:
        ax.axvspan(min(frozen) - 0.5, max(frozen) + 0.5, color="grey", alpha=0.15, label="backbone frozen")
    # A staged run (--stages): a dashed line where each later stage begins.
    starts = [row["epoch"] for previous, row in zip(history, history[1:])
              if row.get("stage") is not None and row.get("stage") != previous.get("stage")]
    for number, epoch in enumerate(starts):
        ax.axvline(epoch - 0.5, color="black", linestyle="--", linewidth=1,
                   label="stage boundary" if number == 0 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss per image")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
