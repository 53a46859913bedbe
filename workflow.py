#!/usr/bin/env python3
"""Pegasus workflow for face-mask detection: generate it, run it locally, or submit it.

    .venv/bin/python workflow.py --local --data data/sample --run-dir runs/sample --jobs 2
    .venv/bin/python workflow.py --data DATA --run-dir runs/access --submit   # on a Pegasus submit host

The driver validates the data and splits it into train/val/test at generation time
(Pegasus needs the file lists), then writes into --run-dir, all with Pegasus.api:

    workflow.yml          the abstract workflow (DAG)
    sites.yml             site catalog, built from the top-level sites.yml config
    transformations.yml   one container, one stageable transformation per bin/ job
    replicas.yml          absolute file:// paths of every input
    pegasus.properties    properties.conf merged with the flags
    workflow.dot/.png     a picture of the DAG (PNG when graphviz `dot` exists)
    validation_report.json, clean_manifest.csv, annotations_clean/, split.csv

--local runs the workflow with the local executor (utils/executor/) on this machine (the default when
pegasus-plan is not installed); --submit plans and submits it with pegasus-plan.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shlex
import shutil
import sys
import time
from pathlib import Path

from Pegasus.api import (File, Job, Properties, ReplicaCatalog, SiteCatalog, Transformation, TransformationCatalog,
                         Workflow)

from utils.atomic import write_text
from utils.defaults import DATA_SHARD_IMAGES, WORKFLOW_OVERRIDES
from utils.detection.stages import stages_to_json
from utils.naming import (TENSORBOARD_FOLDER, TRAIN_CHECKPOINT, evaluation_output_names, fold_set_names, fold_tag,
                          job_id, output_names, report_name, tagged_name, tensorboard_folder, video_output_names)
from utils.cli import error_message
from utils.pegasus import driver, experiment, pegasus_api
from utils.pegasus.catalogs import RESOURCES, build_properties, build_site_catalog, build_transformation_catalog
from utils.pegasus.config import (ConfigError, SplitEntry, WorkflowConfig, parse_label_map, settings_from_args,
                                  trials_per_worker)
from utils.pegasus.graph import write_graph
from utils.pegasus.replicas import WorkflowInputs
from utils.pegasus.inputs import check_pred_images, data_shards, find_videos, plan_data, prediction_shards, write_data
from utils.pegasus.runtimes import CHECKPOINTING, checkpoint_limits, job_runtimes

ROOT = Path(__file__).resolve().parent
WORKFLOW_NAME = "mask-detection"

class MaskDetectionWorkflow:
    """Builds the properties, the three catalogs and the DAG with Pegasus.api."""

    def __init__(self, config: WorkflowConfig):
        self.config = config
        self.run_dir = config.run_dir
        self.paths = {name: self.run_dir / file_name for name, file_name in (
            ("workflow", "workflow.yml"), ("sites", "sites.yml"), ("transformations", "transformations.yml"),
            ("replicas", "replicas.yml"), ("properties", "pegasus.properties"), ("dot", "workflow.dot"),
            ("png", "workflow.png"))}
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.transformations: dict[str, Transformation] = {}

    def build(self) -> "MaskDetectionWorkflow":
        self.create_properties()
        self.create_site_catalog()
        self.create_transformation_catalog()
        self.create_replica_catalog()
        self.create_workflow()
        return self

    # -- properties and site catalog (from properties.conf, the flags and sites.yml) ---------------
    def create_properties(self) -> Properties:
        catalog_files = {"site": self.paths["sites"], "transformation": self.paths["transformations"],
                         "replica": self.paths["replicas"]}
        self.props = build_properties(self.config, catalog_files)
        return self.props

    def _local_dir(self, key: str, default: str) -> Path:
        value = Path(self.config.sites_config.get("local", {}).get(key) or default).expanduser()
        return value if value.is_absolute() else self.run_dir / value

    def output_dir(self) -> Path:
        return self._local_dir("local_storage", "outputs")

    def create_site_catalog(self) -> SiteCatalog:
        self.sc = build_site_catalog(self.config.sites_config, self._local_dir("shared_scratch", "pegasus/scratch"),
                                     self.output_dir(), self.config.sites_file)
        return self.sc

    # -- transformation catalog ----------------------------------------------
    def create_transformation_catalog(self) -> TransformationCatalog:
        self.runtimes = job_runtimes(self.config)
        self.tc, self.transformations = build_transformation_catalog(self.config, self.runtimes)
        return self.tc

    # -- replica catalog -----------------------------------------------------
    def create_replica_catalog(self) -> ReplicaCatalog:
        self.inputs = WorkflowInputs(self.config, self.checkpoint_dir)
        self.rc = self.inputs.catalog()
        return self.rc

    # -- workflow: the spine ---------------------------------------------------
    def create_workflow(self) -> Workflow:
        """The DAG, top to bottom: each step adds its job(s) and returns the Files it hands on."""
        for name, files in self.inputs.split_inputs.items():
            if not files:
                raise ConfigError(f"{self.config.split_csv}: the {name} split is empty; "
                                  "add images or change --fractions")
        self.wf = Workflow(WORKFLOW_NAME, infer_dependencies=True)
        self._add_class_distribution_plot()
        val_set = self._add_preprocess("val")
        test_set = self._add_preprocess("test")
        train_set = self._add_augment()
        worker_results = self._add_hpo(train_set, val_set)
        best_params = self._add_hpo_merge(worker_results)
        model = self._add_train(train_set, val_set, best_params)
        self._add_evaluate(model, test_set)
        fold_models = self._add_folds(train_set, val_set, best_params)
        # --fold-ensemble: the K fold models predict as one ensemble, in place of the final model (photos and videos)
        predicting = fold_models if self.config.fold_ensemble else [model]
        self._add_predict(*predicting)
        self._add_predict_videos(*predicting)
        self._add_report()
        pegasus_api.make_deterministic(self.wf)
        return self.wf

    # -- workflow: one step per job kind ----------------------------------------
    def _job(self, kind: str, job_id: str) -> Job:
        """A job of *kind* with its GPU and checkpoint profiles, already in the workflow."""
        job = Job(self.transformations[kind], _id=job_id, node_label=job_id)
        resources, config = RESOURCES[kind], self.config
        if resources["gpus"] and config.gpus > 0:
            job.add_pegasus_profile(gpus=config.gpus)
            requirements = config.execution_site_config().get("gpu_requirements")
            if requirements:
                job.add_condor_profile(requirements=requirements)
            # No container arguments: for a job with a gpus profile Pegasus itself adds --nv / --gpus all.
        if kind in CHECKPOINTING:
            cap = config.execution_site_config().get("max_job_minutes")
            checkpoint_limits(job, self.runtimes[kind], cap, self.props)
        if self.inputs.experiment_config is not None:
            # Staged into the job's folder, where utils.provenance.run_record finds it for the run record.
            job.add_inputs(self.inputs.experiment_config)
        self.wf.add_jobs(job)
        return job

    @staticmethod
    def _hands_on(job: Job, *files: File) -> None:
        """Outputs that only later jobs read: they stay in the workflow's scratch space."""
        job.add_outputs(*files, stage_out=False, register_replica=False)

    @staticmethod
    def _stages_out(job: Job, *names: str | File) -> None:
        """Final outputs: copied to the output site (RUN_DIR/outputs locally)."""
        job.add_outputs(*(name if isinstance(name, File) else File(name) for name in names),
                        stage_out=True, register_replica=False)

    @staticmethod
    def _if_given(flag: str, value) -> list:
        """[flag, value], or nothing when the value is unset: the job's own default applies and
        workflow.yml stays the same as without the option."""
        return [flag, value] if value not in (None, "") else []

    def _set_args(self, *splits: str, flag: str = "--images") -> tuple[list, list[File]]:
        """(arguments, inputs) that hand *splits* to a job: their shards named after *flag*, or their files
        staged into the job's folder ("."; the names come from split.csv, never from the arguments)."""
        files = [f for split in splits for f in self.inputs.split_inputs[split]]
        if self.config.data_shards is not None:
            return [flag, *files], files
        return ([flag, "."] if flag == "--annotations" else ["--images", ".", "--annotations", "."]), files

    def _add_class_distribution_plot(self) -> None:
        set_args, inputs = self._set_args("train", "val", "test", flag="--annotations")
        if self.config.data_shards is None:
            inputs = [f for f in inputs if f.lfn.lower().endswith(".xml")]
        job = self._job("plot_class_distribution", "plot_class_distribution")
        names = output_names("plot_class_distribution")  # the run record's name follows --output-csv
        job.add_args("--split-csv", self.inputs.split_file, *set_args,
                     "--output", names["plot"], "--output-csv", names["counts_csv"],
                     *self._if_given("--label-map", self.config.label_map))
        job.add_inputs(self.inputs.split_file, *inputs)
        self._stages_out(job, *names.values())

    def _add_preprocess(self, split: str) -> File:
        job = self._job("preprocess", f"preprocess_{split}")
        data_set, report = File(f"{split}_set.tar"), File(report_name(f"preprocess_{split}"))
        set_args, inputs = self._set_args(split)
        job.add_args(*set_args, "--split-csv", self.inputs.split_file, "--split", split, "--prefix", f"{split}_",
                     *self._if_given("--max-size", self.config.max_size),
                     "--output-tar", data_set, "--report", report,
                     *self._if_given("--label-map", self.config.label_map))
        job.add_inputs(self.inputs.split_file, *inputs)
        self._hands_on(job, data_set)
        self._stages_out(job, report)
        return data_set

    def _add_augment(self) -> File:
        config = self.config
        job = self._job("augment", "augment_train")
        train_set, report = File("train_set.tar"), File(report_name("augment_train"))
        set_args, inputs = self._set_args("train")
        job.add_args(*set_args, "--split-csv", self.inputs.split_file, "--split", "train",
                     "--copies", config.augment_copies, "--rare-factor", config.rare_factor,
                     "--noise-std", config.noise_std, "--seed", config.seed,
                     "--output-tar", train_set, "--report", report,
                     *self._if_given("--label-map", self.config.label_map))
        job.add_inputs(self.inputs.split_file, *inputs)
        self._hands_on(job, train_set)
        self._stages_out(job, report)
        return train_set

    def _add_hpo(self, train_set: File, val_set: File) -> list[File]:
        """K search jobs, each with its own Optuna journal as checkpoint; returns their best_<i>.json."""
        config = self.config
        weights_args, weights_inputs = self.inputs.weights_args()
        results = []
        for index, n_trials in enumerate(trials_per_worker(config.trials, config.hpo_jobs)):
            job = self._job("hpo", f"hpo_{index}")
            best, journal = File(f"best_{index}.json"), self.inputs.files[f"hpo_{index}.journal"]
            job.add_args("--train-images", train_set, "--train-annotations", train_set,
                         "--val-images", val_set, "--val-annotations", val_set,
                         "--epochs", config.hpo_epochs, "--image-size", config.image_size,
                         "--n-trials", n_trials, "--seed", config.seed,
                         "--worker-index", index, "--num-workers", config.hpo_jobs,
                         "--study-name", WORKFLOW_NAME, "--backbone", config.backbone,
                         *weights_args, "--checkpoint", journal, "--output", best,
                         # events in a folder of the job, staged out as one .tar of a fixed name (the executor
                         # unpacks it to outputs/tensorboard/hpo_<i>)
                         "--tensorboard-dir", tensorboard_folder("hpo", str(index)),
                         "--tensorboard-tar", f"{TENSORBOARD_FOLDER}_hpo_{index}.tar")
            job.add_inputs(train_set, val_set, *weights_inputs)
            job.add_checkpoint(journal, stage_out=False, register_replica=False)
            self._hands_on(job, best)
            self._stages_out(job, f"best_{index}_run.json", f"{TENSORBOARD_FOLDER}_hpo_{index}.tar")
            results.append(best)
        return results

    def _add_hpo_merge(self, worker_results: list[File]) -> File:
        job = self._job("hpo_merge", "hpo_merge")
        names = output_names("hpo_merge")  # the run record's name follows --output
        best_params, best_params_txt = File(names["params"]), File(names["params_txt"])
        # The trials travel inside best_<i>.json: hpo_merge needs no journal, so no job reads
        # another job's checkpoint file (whose catalog entry is the empty initial file).
        job.add_args("--inputs", *worker_results,
                     "--output", best_params, "--output-txt", best_params_txt, "--plots-dir", ".")
        job.add_inputs(*worker_results)
        self._stages_out(job, best_params, best_params_txt, names["run_record"], names["history_plot"],
                         names["importance_plot"])
        return best_params

    def _add_train(self, train_set: File, val_set: File, best_params: File, tag: str | None = None) -> File:
        """train (the final model), or with *tag* a fold's train job: the same settings on the fold's sets,
        every output, its checkpoint and its TensorBoard folder named for the fold. Returns the model File."""
        config, names = self.config, output_names("train", tag)  # the run record's name follows --output
        weights_args, weights_inputs = self.inputs.weights_args()
        stages_args, stages_inputs = self.inputs.stages_args()
        job = self._job("train", job_id("train", tag))
        model, checkpoint = File(names["model"]), self.inputs.files[tagged_name(TRAIN_CHECKPOINT, tag)]
        job.add_args("--images", train_set, "--annotations", train_set,
                     "--val-images", val_set, "--val-annotations", val_set,
                     "--params", best_params, "--epochs", config.epochs,
                     *self._if_given("--time-budget", config.time_budget),
                     *stages_args,
                     "--image-size", config.image_size, "--backbone", config.backbone,
                     *weights_args, "--checkpoint", checkpoint, "--output", model,
                     "--metrics-csv", names["metrics_csv"], "--loss-plot", names["loss_plot"], "--seed", config.seed,
                     *self._if_given("--label-map", self.config.label_map),
                     "--tensorboard-dir", tensorboard_folder("train", tag),
                     "--tensorboard-tar", names["tensorboard_tar"])
        job.add_inputs(train_set, val_set, best_params, *weights_inputs, *stages_inputs)
        job.add_checkpoint(checkpoint, stage_out=False, register_replica=False)
        self._stages_out(job, model, names["run_record"], names["metrics_csv"], names["loss_plot"],
                         names["tensorboard_tar"])
        if tag:
            self._sized_as(job, "train_fold")
        return model

    def _add_evaluate(self, model: File, test_set: File, tag: str | None = None) -> File:
        """evaluate (the final model on the test split), or with *tag* a fold model on its held-out fold.
        Returns the evaluation.json File."""
        names = evaluation_output_names(tag)
        job = self._job("evaluate", job_id("evaluate", tag))
        # Without --score-threshold, evaluate and predict use the threshold train chose on validation.
        job.add_args("--images", test_set, "--annotations", test_set, "--model", model, "--output-dir", ".",
                     *self._if_given("--output-tag", tag),
                     *self._if_given("--score-threshold", self.config.score_threshold))
        job.add_inputs(test_set, model)
        if tag:
            self._sized_as(job, "evaluate_fold")
        evaluation = File(names["evaluation.json"])
        self._stages_out(job, evaluation, *(name for key, name in names.items() if key != "evaluation.json"))
        return evaluation

    def _add_folds(self, train_set: File, val_set: File, best_params: File) -> list[File]:
        """--folds K: per fold, make_fold cuts the fold's training, validation and held-out sets out of the
        preprocessed train and val sets (RUN_DIR/folds.csv, written at generation); train_fold<i> trains with
        the final model's settings (best HPO parameters, --epochs or --time-budget) on the train-split images
        of the other folds, validated (threshold, the estimators' rates) on their val-split images; and
        evaluate_fold<i> evaluates it on the held-out fold, which it never trained or validated on.
        aggregate_folds writes mean ± std over the folds. Returns the fold models."""
        models, evaluations = [], []
        for fold in range(self.config.folds):
            tag = fold_tag(fold)
            fold_train, fold_val, fold_held_out = self._add_make_fold(fold, train_set, val_set)
            models.append(self._add_train(fold_train, fold_val, best_params, tag=tag))
            evaluations.append(self._add_evaluate(models[-1], fold_held_out, tag=tag))
        if models:
            job = self._job("aggregate_folds", "aggregate_folds")
            job.add_args("--inputs", *evaluations, "--output-dir", ".")
            job.add_inputs(*evaluations)
            self._stages_out(job, *output_names("aggregate_folds").values())
        return models

    def _add_make_fold(self, fold: int, train_set: File, val_set: File) -> tuple[File, File, File]:
        """make_fold<i>: the fold's training, validation and held-out sets (Files handed on to its train
        and evaluate)."""
        make_fold = job_id("make", fold_tag(fold))
        job = self._job("make_fold", make_fold)
        fold_train, fold_val, fold_held_out = (File(name) for name in fold_set_names(fold_tag(fold)))
        job.add_args("--train-set", train_set, "--val-set", val_set, "--folds-csv", self.inputs.folds_file,
                     "--fold", fold, "--output-train", fold_train, "--output-val", fold_val,
                     "--output-held-out", fold_held_out, "--report", report_name(make_fold))
        job.add_inputs(train_set, val_set, self.inputs.folds_file)
        self._hands_on(job, fold_train, fold_val, fold_held_out)
        self._stages_out(job, report_name(make_fold))
        return fold_train, fold_val, fold_held_out

    def _sized_as(self, job: Job, workload: str) -> None:
        """Job-level time limits from *workload* (runtimes.py), over those of the job's transformation."""
        runtime = self.runtimes[workload]
        job.add_pegasus_profile(runtime=str(runtime))
        if job.transformation in CHECKPOINTING:
            checkpoint_limits(job, runtime, self.config.execution_site_config().get("max_job_minutes"), self.props)

    def _add_predict(self, *models: File) -> None:
        """One predict job per shard of the prediction set, then one merge into compliance.json; several
        *models* (the fold models of --fold-ensemble) predict as one ensemble (weighted box fusion)."""
        config, parts = self.config, []
        shards = config.pred_shards
        # --annotate-max spread over the shards: the first (annotate_max % shards) draw one more.
        drawn = trials_per_worker(config.annotate_max, len(shards))
        for shard, pred_file, annotate in zip(shards, self.inputs.pred_files, drawn):
            job = self._job("predict", f"predict_{shard.tag}")
            names = output_names("predict", shard.tag)
            part, annotated = File(names["predictions_json"]), File(f"annotated_{shard.tag}.tar")
            resume = self.inputs.checkpoint_args(job, "predict", shard.tag)  # its progress kept between tries
            job.add_args("--images", pred_file, "--model", *models, "--output-dir", ".", "--output-tag", shard.tag,
                         "--annotate-max", annotate, "--annotated-tar", annotated, *resume,
                         *self._if_given("--score-threshold", config.score_threshold))
            job.add_inputs(*models, pred_file)
            # The parts go to the merge and are kept too; an annotated .tar is staged out where images were drawn.
            job.add_outputs(part, stage_out=True, register_replica=False)
            self._stages_out(job, names["compliance_json"], names["run_record"])
            job.add_outputs(annotated, stage_out=annotate > 0, register_replica=False)
            parts.append(part)
        job = self._job("merge_predictions", "merge_predictions")
        # The parts are found in the job's folder: its arguments do not grow with the shards.
        job.add_args("--inputs-dir", ".", "--expected", len(parts), "--output-dir", ".")
        job.add_inputs(*parts)
        self._stages_out(job, *output_names("merge_predictions").values())

    def _add_predict_videos(self, *models: File) -> None:
        """One predict_video job per video of --pred-videos (none without it), with the *models* predict has."""
        for video, video_file in zip(self.config.pred_videos, self.inputs.video_files):
            job = self._job("predict_video", f"predict_video_{video.tag}")
            tag, resume = video.tag, self.inputs.checkpoint_args(job, "predict_video", video.tag)
            job.add_args("--source", video_file, "--model", *models, "--output-dir", ".", "--output-tag", tag,
                         "--stride", self.config.video_stride, "--output-video", f"annotated_{tag}.mp4",
                         *self._if_given("--score-threshold", self.config.score_threshold), *resume)
            job.add_inputs(*models, video_file)
            self._stages_out(job, *video_output_names(tag).values(), f"annotated_{tag}.mp4")

    def _add_report(self) -> None:
        """The run's report page, last: its inputs are the staged-out outputs of the jobs before it
        that the page shows (utils.reporting.run_folder.is_report_input), staged side by side."""
        from utils.reporting.run_folder import is_report_input

        shown = {use.file.lfn: use.file for job in self.wf.jobs.values() for use in job.uses
                 if pegasus_api.use_type(use) == "output" and use.stage_out and is_report_input(use.file.lfn)}
        job = self._job("report", "report")
        job.add_args(".", "--output", "report.html", "--run-record", "report_run.json", "--run-name", self.run_dir.name)
        job.add_inputs(self.inputs.split_file, *(shown[lfn] for lfn in sorted(shown)))
        self._stages_out(job, "report.html", "report_run.json")

    # -- output --------------------------------------------------------------
    def write(self, graph: bool = True) -> dict[str, Path]:
        """Write the catalogs, the workflow and the properties (each atomically) into the run dir."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        for path in self.inputs.initial_checkpoints.values():
            if not path.exists():
                path.touch()
        job_settings = None
        if self.inputs.experiment_config is not None:
            job_settings = experiment.write_job_settings(self.inputs.paths[self.inputs.experiment_config.lfn],
                                                         self.config.experiment_settings)
        if self.inputs.stages_file is not None:
            write_text(self.inputs.paths[self.inputs.stages_file.lfn], stages_to_json(self.config.train_stages) + "\n")
        buffer = io.StringIO()
        self.props.write(buffer)
        write_text(self.paths["properties"], buffer.getvalue())
        pegasus_api.write_catalogs({self.paths[key]: catalog for key, catalog in (  # the DAG last (generate())
            ("sites", self.sc), ("transformations", self.tc), ("replicas", self.rc), ("workflow", self.wf))})
        written = {key: self.paths[key] for key in ("workflow", "sites", "transformations", "replicas", "properties")}
        if job_settings is not None:
            written["experiment_config"] = job_settings
        if graph:
            written.update(write_graph(self.wf, len(self.config.entries), self.paths["dot"], self.paths["png"]))
        return written

    def plan_options(self, submit: bool = True) -> dict:
        """Workflow.plan()'s options for this run directory (also the printed pegasus-plan command)."""
        return {"conf": self.paths["properties"], "sites": [self.config.execution_site], "output_sites": ["local"],
                "dir": self.run_dir / "submit", "cleanup": "leaf", "force": True, "submit": submit}

    def plan_command(self, submit: bool = True) -> list[str]:
        """The exact pegasus-plan command line for this run directory."""
        return ["pegasus-plan", *pegasus_api.planner_arguments(**self.plan_options(submit)),
                str(self.paths["workflow"])]


# -- the driver ---------------------------------------------------------------

def get_args_parser():
    return driver.workflow_args_parser(__doc__, ROOT, WORKFLOW_OVERRIDES)


def generate(args, held: contextlib.ExitStack) -> tuple[MaskDetectionWorkflow, dict[str, Path], dict, list[SplitEntry]]:
    """The settings, --pred-images and --pred-videos checked, the data validated and split (and the folds, fixed
    at generation like the split: the fold jobs' inputs must be known to plan) in memory and checked, all before
    anything is written; then the data files, the catalogs and the DAG written, and the settings recorded.
    Raises ConfigError."""
    settings = settings_from_args(args, ROOT)
    run_dir, data_dir, label_map = args.run_dir.resolve(), args.data.resolve(), parse_label_map(settings.label_map)
    pred_images = check_pred_images(args.pred_images and args.pred_images.resolve(), run_dir)
    videos = find_videos(args.pred_videos.resolve()) if args.pred_videos else []
    data = plan_data(data_dir, run_dir, args.seed, tuple(args.fractions), args.near_duplicate_distance, label_map,
                     args.folds, settings.label)
    held.enter_context(driver.run_lock(run_dir))  # kept till the run ends: no other run writes here meanwhile
    (run_dir / "workflow.yml").unlink(missing_ok=True)  # written last: a generation stopped part way runs nothing
    split_csv, folds_csv = write_data(data)  # the first file written into the run folder
    report, entries = data.report, data.entries
    pred_shards = prediction_shards(pred_images, entries, run_dir, args.images_per_job)
    shards = data_shards(entries, run_dir, DATA_SHARD_IMAGES) if len(entries) > args.shard_data_above else None
    # Every setting as the run uses it: what sites.yml chose for an unset flag, the parsed stages.
    recorded = experiment.effective_settings(args, resolved={
        "execution_site": settings.execution_site, "container_type": settings.container_type,
        "container_image": settings.container_image, "jobs": driver.local_jobs(args.jobs),
        "train_stages": settings.train_stages and [stage.to_dict() for stage in settings.train_stages]})
    config = WorkflowConfig.from_settings(
        settings, run_dir=args.run_dir, split_csv=split_csv, entries=entries, pred_shards=pred_shards,
        data_shards=shards, pred_videos=videos, folds_csv=folds_csv,
        experiment_settings=experiment.job_settings(recorded))
    generator = MaskDetectionWorkflow(config).build()
    # the settings' record (compare_runs and the report read it) before the DAG, which comes last
    recorded_file = experiment.write_effective_config(run_dir / experiment.CONFIG_FILE, recorded,
                                                      getattr(args, "experiment", None))
    written = generator.write()
    written["config"] = recorded_file
    return generator, written, report, entries


def main(args) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    started = time.perf_counter()
    with contextlib.ExitStack() as held:  # the run folder's lock, which generate() takes
        try:
            if args.write_default_config is not None:
                path = experiment.write_default_config(get_args_parser(), args.write_default_config)
                return print(f"Every setting with its default: {path}") or 0
            generator, written, report, entries = generate(args, held)
        except (ConfigError, OSError) as error:  # a run folder or --write-default-config path not writable too
            print(f"workflow.py: {error_message(error)}", file=sys.stderr)
            return 2
        run_dir, config = generator.run_dir, generator.config
        counts = {name: sum(1 for e in entries if e.split == name) for name in ("train", "val", "test")}
        print(f"Validated {args.data.resolve()}: {report.get('images_usable', len(entries))} usable of "
              f"{report.get('images_total', '?')} images (report: {run_dir / 'validation_report.json'})")
        print(f"Split: train {counts['train']}, val {counts['val']}, test {counts['test']}; "
              f"predicting on {sum(shard.images for shard in config.pred_shards)} images in "
              f"{len(config.pred_shards)} shard(s)")
        print(f"Workflow: {len(generator.wf.jobs)} jobs ({config.hpo_jobs} HPO) written to {run_dir} "
              f"in {time.perf_counter() - started:.1f}s: " + ", ".join(path.name for path in written.values()))

        has_planner = shutil.which("pegasus-plan") is not None
        if args.submit:
            return driver.submit(generator, has_planner)
        if args.generate_only or (has_planner and not args.local):
            print(f"To plan and submit:\n  {shlex.join(generator.plan_command())}")
            return 0

        return driver.run_locally(run_dir, generator.output_dir(), driver.local_jobs(args.jobs))


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
