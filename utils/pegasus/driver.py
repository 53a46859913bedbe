"""workflow.py's command line: its flags, and what happens after generation (submit, or run here).

workflow.py keeps the job tables, the generator and a short main(); this module holds
the parts of the driver that do not change when the DAG does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
from pathlib import Path

from .. import defaults as D
from ..detection.weights import BACKBONES
from ..cli import (fraction, image_size_px, int_at_least, near_duplicate_bits, non_negative_float, non_negative_int,
                   path_arg, positive_int, random_seed)
from .config import CONTAINER_KINDS, ConfigError
from .experiment import ExperimentArgumentParser


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default in --help, once: a help that gives its default in
    words keeps them, without argparse's "(default: None)" after them."""

    def _get_help_string(self, action):
        return action.help if "(default:" in (action.help or "") else super()._get_help_string(action)


def workflow_args_parser(description: str, root: Path, overrides: dict) -> argparse.ArgumentParser:
    """workflow.py's flags; defaults from utils/defaults.py except the workflow's named *overrides*."""
    # prog: errors read "workflow.py: ..." however the parser is reached (python workflow.py, tests).
    parser = ExperimentArgumentParser(prog="workflow.py", description=description, formatter_class=_HelpFormatter)
    parser.add_argument("--config", type=path_arg, default=None, metavar="EXPERIMENT.yml",
                        help="experiment file: any of the flags below as YAML keys with underscores "
                             "(image_size: 512); flags given here override it; relative paths in it are "
                             "relative to its folder (every key: experiments/default.yml)")
    parser.add_argument("--write-default-config", type=path_arg, default=None, metavar="PATH",
                        help="write every setting with its default and help as a commented experiment file "
                             "(experiments/default.yml) and exit")
    data = parser.add_setting_group("data")
    data.add_argument("--data", type=path_arg, default=root / "data" / "sample",
                      help="folder with images/ and annotations/ (Pascal VOC)")
    data.add_argument("--pred-images", type=path_arg, default=None,
                      help="images to predict on: a folder of images, packed into shards of --images-per-job "
                           "in RUN_DIR/pred_shards, or a shard folder of bin/make_shards.py, used as it is; one "
                           "predict job per shard (default: the test split's images)")
    data.add_argument("--pred-videos", type=path_arg, default=None,
                      help="folder of videos: one predict_video job per video (per-frame CSV, plot, summary, "
                           "annotated video) (default: none)")
    data.add_argument("--video-stride", type=int, default=D.VIDEO_STRIDE,
                      help="with --pred-videos: process every N-th frame")
    data.add_argument("--shard-data-above", type=int, default=D.SHARD_DATA_ABOVE,
                      help=f"above this many usable images, each split travels as .tar shards of "
                           f"{D.DATA_SHARD_IMAGES} images (RUN_DIR/data_shards), not as one replica per file")
    data.add_argument("--images-per-job", type=int, default=D.PREDICT_IMAGES_PER_JOB,
                      help="images per predict job (shard size) when --pred-images is a plain folder")
    data.add_argument("--annotate-max", type=int, default=D.ANNOTATE_MAX,
                      help="annotated images to draw over the whole prediction set, spread over the shards "
                           "(0: none), so stage-out never carries every image")
    data.add_argument("--run-dir", type=path_arg, default=root / "runs" / "workflow",
                      help="where the workflow, catalogs, logs and outputs go")
    data.add_argument("--fractions", type=float, nargs=3, default=D.SPLIT_FRACTIONS,
                      metavar=("TRAIN", "VAL", "TEST"),
                      help=f"split fractions (default: {' '.join(map(str, D.SPLIT_FRACTIONS))})")
    data.add_argument("--near-duplicate-distance", type=near_duplicate_bits, default=D.NEAR_DUPLICATE_DISTANCE,
                      help="perceptual-hash Hamming distance (of 64 bits) up to which images count as near "
                           "duplicates, of which one is kept (validation_report.json lists the others); -1: no search")
    data.add_argument("--label-map", default=D.LABEL_MAP, metavar="SOURCE=CLASS,...",
                      help="read these object names of another data set as classes, e.g. "
                           "'with_incorrect_mask=mask_weared_incorrect, mask=with_mask, no_mask=without_mask'; "
                           "validation, the split and the jobs that read XML apply it (default: none)")
    model = parser.add_setting_group("model and training (defaults: utils/defaults.py, except "
                                      "its WORKFLOW_OVERRIDES for make run's budget)")
    model.add_argument("--epochs", type=int, default=overrides["epochs"], help="training epochs of the final model")
    model.add_argument("--time-budget", type=float, default=D.TIME_BUDGET, metavar="MINUTES",
                       help="minutes of training (validation included) for the train job, which fits its epochs "
                            "and cosine length to them; replaces --epochs (default: --epochs)")
    model.add_argument("--hpo-epochs", type=int, default=overrides["hpo_epochs"], help="epochs per HPO trial")
    model.add_argument("--trials", type=int, default=overrides["trials"],
                       help="HPO trials in total, spread over the HPO jobs")
    model.add_argument("--hpo-jobs", type=int, default=D.HPO_JOBS, help="parallel HPO jobs (K)")
    model.add_argument("--backbone", choices=BACKBONES, default=D.BACKBONE, help="detector backbone (see bin/train.py)")
    model.add_argument("--image-size", type=image_size_px, default=overrides["image_size"],
                       help="longest image side the detector works at")
    model.add_argument("--seed", type=random_seed, default=D.SEED,
                       help="seed for split, augmentation, HPO, training")
    model.add_argument("--augment-copies", type=non_negative_int, default=overrides["augment_copies"],
                       help="augmented copies per training image")
    model.add_argument("--rare-factor", type=non_negative_int, default=overrides["rare_factor"],
                       help="extra augmented copies of each image with the rare class (mask_weared_incorrect)")
    model.add_argument("--noise-std", type=non_negative_float, default=D.NOISE_STD,
                       help="Gaussian noise std (0-255 scale)")
    model.add_argument("--max-size", type=int_at_least(16), default=D.PREPROCESS_MAX_SIZE,
                       help="preprocess: cap the val and test images' longest side at this many pixels (default: "
                            "their own size, as predict reads photos; a cap makes the choices made on validation "
                            "and the test figures differ from what predict sees)")
    model.add_argument("--score-threshold", type=fraction, default=None,
                       help="detection score threshold for evaluation and prediction (default: the one train "
                            "chooses on the validation split and stores in model.pt)")
    model.add_argument("--train-stages", default=D.STAGES, metavar="JSON|FILE",
                       help="train in stages, each with its own epochs, lr and trainable backbone layers "
                            "(0: backbone frozen), e.g. '[{\"epochs\": 3, \"lr\": 0.02, \"trainable_layers\": 0}, "
                            "{\"epochs\": 10, \"lr\": 0.005, \"trainable_layers\": 5}]', or a .json/.yml file of "
                            "that list; in an experiment file a YAML list of mappings; replaces --epochs, and "
                            "--time-budget scales the stages to its minutes (default: one stage of --epochs)")
    model.add_argument("--no-pretrained", action="store_true",
                       help="do not pass the cached pretrained weights of --backbone (WIDER FACE RetinaFace, "
                            "ImageNet MobileNetV2) to hpo/train")
    model.add_argument("--folds", type=int, default=D.FOLDS, metavar="K",
                       help="k-fold cross-validation on the train+val pool: K train + evaluate jobs (folds "
                            "group-aware and stratified like the split, RUN_DIR/folds.csv) and an aggregate job "
                            "writing kfold_summary.json/.txt (mean ± std per metric and class); 0: none")
    model.add_argument("--fold-ensemble", action="store_true",
                       help="with --folds: the predict and predict_video jobs use the K fold models as one ensemble "
                            "(boxes merged by weighted box fusion) instead of the final model; an ensemble has no "
                            "validation rates, so its headline estimator is cc")
    pegasus = parser.add_setting_group("Pegasus")
    pegasus.add_argument("--gpus", type=int, default=D.GPUS,
                         help="GPUs per hpo/train/evaluate/predict/predict_video job (0: CPU only)")
    pegasus.add_argument("--container-type", choices=[*CONTAINER_KINDS, "none"], default=None,
                         help="container for every job (default: sites.yml container.type)")
    pegasus.add_argument("--container-image", default=None,
                         help="docker://OWNER/NAME:TAG (default: sites.yml container.image)")
    pegasus.add_argument("--execution-site", default=None, help="site the jobs run on (default: sites.yml)")
    pegasus.add_argument("--sites-config", type=path_arg, default=root / "sites.yml",
                         help="user-editable site configuration")
    pegasus.add_argument("--properties", type=path_arg, default=root / "properties.conf",
                         help="Pegasus properties merged with the flags")
    pegasus.add_argument("--retries", type=non_negative_int, default=None,
                         help="dagman.retry (default: properties.conf)")
    pegasus.add_argument("--mode", default=None, help="pegasus.mode (default: properties.conf)")
    pegasus.add_argument("--transfer-threads", type=positive_int, default=None,
                         help="pegasus.transfer.threads (default: properties.conf)")
    run = parser.add_setting_group("running")
    how = run.add_mutually_exclusive_group()
    how.add_argument("--local", action="store_true",
                     help="run the workflow on this machine with the local executor (utils/executor/) "
                          "(default: when pegasus-plan is not installed)")
    how.add_argument("--submit", action="store_true", help="plan and submit with pegasus-plan")
    how.add_argument("--generate-only", action="store_true",
                     help="write the workflow and catalogs, run nothing (default: when pegasus-plan is installed)")
    run.add_argument("--jobs", type=int, default=None,
                     help="local executor: jobs at once, within the CPUs their cores ask for (None: min(4, CPUs))")
    run.add_argument("-v", "--verbose", action="store_true", help="log more")
    return parser


def local_jobs(jobs: int | None) -> int:
    """--jobs, or min(4, CPUs) when not given (left open in the flags so that experiments/default.yml
    holds no machine's CPU count)."""
    return jobs if jobs is not None else min(D.LOCAL_JOBS_MAX, os.cpu_count() or 1)


def submit(generator, has_planner: bool) -> int:
    """Plan and submit with pegasus-plan; without a planner, print the command to run on a submit host."""
    if not has_planner:
        # The catalogs name every input by its absolute path here, so a copied run folder plans only at the same path.
        print("pegasus-plan is not on PATH: this machine is not a Pegasus submit host.\n"
              "Run the same workflow.py command on one (e.g. ACCESS Pegasus, after make setup there); or, where the\n"
              "project and this run folder lie at the same paths there, plan and submit this run folder with:\n"
              f"  {shlex.join(generator.plan_command())}\n"
              "or run the same workflow here with --local.", file=sys.stderr)
        return 3
    from Pegasus.api import PegasusClientError

    from .pegasus_api import planner_output_to

    log_path = generator.config.run_dir / "pegasus-plan.log"
    try:
        with planner_output_to(log_path):
            generator.wf.plan(**generator.plan_options(submit=True))
    except PegasusClientError as error:
        last_lines = "\n".join(str(error.output).strip().splitlines()[-15:])
        print(f"pegasus-plan failed; its last lines follow, all of its output is in {log_path}:\n{last_lines}",
              file=sys.stderr)
        return 1
    print(submit_summary(generator.wf.braindump.submit_dir, log_path))
    return 0


def submit_summary(submit_dir, log_path) -> str:
    """What to run next, after a submit; the planner's own output stays in its log file."""
    return (f"Submitted; the planner's output is in {log_path}.\n"
            f"  submit dir: {submit_dir}\n"
            f"  pegasus-status -l {submit_dir}           # watch\n"
            f"  pegasus-analyzer {submit_dir}            # when a job fails\n"
            f"  pegasus-statistics -s all {submit_dir}   # when it is done\n"
            f"  pegasus-remove {submit_dir}              # to stop it")


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """The run folder's lock (utils.executor.run_lock); a folder in use is a ConfigError, one line."""
    from ..executor import WorkflowError, run_lock as executor_lock

    try:
        with executor_lock(run_dir):
            yield
    except WorkflowError as error:
        raise ConfigError(str(error)) from None


def run_locally(run_dir: Path, output_dir: Path, jobs: int) -> int:
    """Run (or resume) the workflow with the local executor; print the results' summary when it succeeds."""
    from ..executor import run_workflow

    status = run_workflow(run_dir, jobs=jobs)
    if status == 0:
        try:
            print_summary(run_dir, output_dir)
        except BrokenPipeError:  # `workflow.py ... | head`: no reader for the summary; the run itself succeeded
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush is quiet
    elif status != 2:
        print(f"\nThe workflow did not finish (see {run_dir / 'statistics.txt'} and the logs in "
              f"{run_dir / 'logs'}); run the same command again to resume it.", file=sys.stderr)
    return status


def print_summary(run_dir: Path, output_dir: Path) -> None:
    """The evaluation summary, the compliance line and where the results are."""
    evaluation, compliance = output_dir / "evaluation.json", output_dir / "compliance.json"
    if evaluation.is_file():
        text_summary = output_dir / "evaluation.txt"
        print("\n== Evaluation (test split) ==")
        if text_summary.is_file():
            print(text_summary.read_text(encoding="utf-8").rstrip())
        else:
            print(json.dumps(json.loads(evaluation.read_text(encoding="utf-8")), indent=2)[:2000])
    kfold = output_dir / "kfold_summary.txt"
    if kfold.is_file():
        print("\n== Cross-validation (train+val pool) ==")
        print(kfold.read_text(encoding="utf-8").rstrip())
    if compliance.is_file():
        from ..detection.compliance import compliance_line

        data = json.loads(compliance.read_text(encoding="utf-8"))
        print("\n== Compliance (predicted images) ==")
        try:
            # merge_predictions' line: the figure with its 95 % interval and the images it rests on
            estimate = data.get("estimate")
            line = compliance_line(data["overall"], estimate)
            print(line if estimate else f"{line} ({data.get('num_images', '?')} images)")
        except (KeyError, TypeError):
            print(f"{compliance}: no overall summary in it")
    print(f"\nResults: {output_dir}")
    print(f"Statistics: {run_dir / 'statistics.txt'}  Logs: {run_dir / 'logs'}")
