"""Output file names of the workflow's jobs, in one place: the generator declares them (workflow.py), the
jobs write them (bin/), the report reads them (utils/reporting/run_folder.py).

A tagged job is one of several of its kind in a workflow (a fold, a video): each of its file names carries
the tag (tagged_name), so that the jobs of one workflow write distinct files.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from .errors import shown

# Suffixes that say what a file is to its job: the tag goes before them, so that the file still ends in them.
ROLE_SUFFIXES = ("_run.json", "_checkpoint.pt", "_checkpoint.tar", "_checkpoint.jsonl")

# The evaluate job's files, keyed by their untagged name (utils/detection/evaluation.py reads them so).
_EVALUATE_FILES = ("evaluation.json", "evaluation.txt", "confusion_matrix.csv", "confusion_matrix.png",
                   "evaluation_images.json", "pr_curves.png", "evaluate_run.json")

# Job kind -> role -> untagged file name of the files that job writes and the workflow keeps.
OUTPUTS: dict[str, dict[str, str]] = {
    "plot_class_distribution": {"plot": "class_distribution.png", "counts_csv": "class_distribution.csv",
                                "run_record": "class_distribution_run.json"},
    "hpo_merge": {"params": "best_hpo_params.json", "params_txt": "best_hpo_params.txt",
                  "run_record": "best_hpo_params_run.json", "history_plot": "optimization_history.png",
                  "importance_plot": "param_importances.png"},
    "train": {"model": "model.pt", "run_record": "model_run.json", "metrics_csv": "train_metrics.csv",
              "loss_plot": "loss_curve.png", "tensorboard_tar": "tensorboard_train.tar"},
    "evaluate": {name: name for name in _EVALUATE_FILES},
    "predict": {"predictions_json": "predictions.json", "predictions_csv": "predictions.csv",
                "compliance_json": "compliance.json", "folder_plot": "compliance_by_folder.png",
                "run_record": "predict_run.json"},
    "merge_predictions": {"compliance": "compliance.json", "predictions_csv": "predictions.csv",
                          "histogram": "compliance_histogram.png", "folder_plot": "compliance_by_folder.png",
                          "run_record": "merge_predictions_run.json"},
    "predict_video": {"frames_csv": "video_frames.csv", "plot": "compliance_over_time.png",
                      "summary": "video_summary.json", "run_record": "predict_video_run.json"},
    "aggregate_folds": {"summary": "kfold_summary.json", "summary_txt": "kfold_summary.txt",
                        "plot": "kfold_folds.png", "run_record": "aggregate_folds_run.json"},
}

# Files a train job keeps between its own tries (never staged out): its checkpoint, and the folder its
# TensorBoard events are written to before they are packed into the tensorboard_tar output.
TRAIN_CHECKPOINT = "train_checkpoint.pt"
# A predict job's progress, kept between its tries as one file (utils/detection/prediction_checkpoint.py), and a
# predict_video job's (utils/detection/video_progress.py); tagged with the shard or the video:
# predict_shard-000000_checkpoint.tar, predict_video_clip_checkpoint.jsonl.
PREDICT_CHECKPOINT = "predict_checkpoint.tar"
VIDEO_CHECKPOINT = "predict_video_checkpoint.jsonl"
TENSORBOARD_FOLDER = "tensorboard"  # the events of job J are under tensorboard/J, in its folder and its .tar


def tagged_name(name: str, tag: str | None) -> str:
    """*name* with *tag* before its role suffix or extension: model.pt -> model_fold0.pt, evaluate_run.json ->
    evaluate_fold0_run.json, train_checkpoint.pt -> train_fold0_checkpoint.pt; *name* itself without a tag."""
    if not tag:
        return name
    for suffix in ROLE_SUFFIXES:
        if name.endswith(suffix):
            return f"{name[:-len(suffix)]}_{tag}{suffix}"
    path = PurePosixPath(name)
    return f"{path.stem}_{tag}{path.suffix}"


def output_names(kind: str, tag: str | None = None) -> dict[str, str]:
    """Role -> file name of job *kind*'s outputs, each carrying *tag* when given."""
    return {role: tagged_name(name, tag) for role, name in OUTPUTS[kind].items()}


def evaluation_output_names(tag: str | None = None) -> dict[str, str]:
    """The evaluate job's file names keyed by their untagged name (evaluation.json -> evaluation_fold0.json)."""
    return output_names("evaluate", tag)


def video_output_names(tag: str | None = None) -> dict[str, str]:
    """The predict_video job's file names by role (frames_csv, plot, summary, run_record)."""
    return output_names("predict_video", tag)


def job_id(kind: str, tag: str | None = None) -> str:
    """The workflow's id of a job of *kind*: train, train_fold0."""
    return f"{kind}_{tag}" if tag else kind


def tensorboard_folder(kind: str, tag: str | None = None) -> str:
    """The job's folder of TensorBoard events inside its working directory: tensorboard/train_fold0."""
    return f"{TENSORBOARD_FOLDER}/{job_id(kind, tag)}"


def report_name(job: str) -> str:
    """The JSON report a data job (preprocess_test, augment_train, make_fold0) writes: preprocess_test_report.json."""
    return f"{job}_report.json"


def fold_tag(fold: int) -> str:
    """The tag of cross-validation fold *fold* (0-based): fold0."""
    return f"fold{fold}"


def fold_set_names(tag: str) -> tuple[str, str, str]:
    """The training, validation and held-out sets make_fold cuts for fold *tag*: fold0_train.tar,
    fold0_val.tar, fold0_held_out.tar."""
    return f"{tag}_train.tar", f"{tag}_val.tar", f"{tag}_held_out.tar"


def annotated_stem(relative: str) -> str:
    """The stem of an image's annotated copy (annotated_<stem>.jpg), from its path below the folder or inside the
    archive it was read from: the subfolders joined with "__" ("siteA/cam1/img.jpg" -> "siteA__cam1__img"), so
    that photos of one name in different folders get different annotated files, and the report (which finds a
    photo's figures in compliance.json by the same stem) never shows one photo's figures under another."""
    path = PurePosixPath(relative)
    return "__".join([*path.parent.parts, path.stem]) if path.parent.parts else path.stem


def name_part_problem(text: str) -> str | None:
    """Why *text* cannot be put in front of an output file's name (preprocess --prefix), or None: a path
    separator or '..' would put the file in another folder (outside the output folder, or a subfolder of an
    archive that the jobs reading it leave out), a leading dot would hide it from them, a NUL byte is no name."""
    if any(part in text for part in ("/", "\\", "..", "\0")):
        return f"expected a plain file-name part (no '/', '\\', '..' or NUL), got {shown(text)}"
    if text.startswith("."):
        return f"expected a plain file-name part (no leading '.', which hides the files), got {shown(text)}"
    return None
