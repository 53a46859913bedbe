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

--local runs the workflow with utils/pegasus/executor.py on this machine (the default when
pegasus-plan is not installed); --submit plans and submits it with pegasus-plan.
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402
from Pegasus.api import (  # noqa: E402
    OS,
    Arch,
    Container,
    Directory,
    File,
    FileServer,
    Job,
    Namespace,
    Operation,
    Properties,
    ReplicaCatalog,
    Site,
    SiteCatalog,
    Transformation,
    TransformationCatalog,
    Workflow,
)

from utils.atomic import atomic_path, write_json, write_text  # noqa: E402

log = logging.getLogger("workflow")

WORKFLOW_NAME = "mask-detection"

# Job kind -> script. Every kind is one stageable transformation of the same name.
JOB_SCRIPTS = {
    "plot_class_distribution": "bin/plot_class_distribution.py",
    "preprocess": "bin/preprocess.py",
    "augment": "bin/augment.py",
    "hpo": "bin/hpo.py",
    "hpo_merge": "bin/hpo_merge.py",
    "train": "bin/train.py",
    "evaluate": "bin/evaluate.py",
    "predict": "bin/predict.py",
}

# What each job kind asks of an execution node, in one place. Applied as pegasus
# profiles (cores, memory, runtime in seconds; HTCondor derives request_cpus and
# request_memory from them). "gpus" marks kinds that use a GPU when --gpus N > 0
# asks for GPUs: those jobs then request N. checkpoint_time / max_walltime
# (minutes) apply to the checkpointing kinds: at checkpoint.time the job gets
# SIGTERM and saves its checkpoint; at maxwalltime it is killed and retried from
# the checkpoint (pegasus-kickstart semantics; utils/pegasus/executor.py does the same).
RESOURCES = {
    "plot_class_distribution": {"cores": 1, "memory": "1 GB", "runtime": 300, "gpus": 0},
    "preprocess": {"cores": 1, "memory": "2 GB", "runtime": 900, "gpus": 0},
    "augment": {"cores": 1, "memory": "2 GB", "runtime": 1800, "gpus": 0},
    "hpo": {"cores": 4, "memory": "8 GB", "runtime": 7200, "gpus": 1,
            "checkpoint_time": 110, "max_walltime": 120},
    "hpo_merge": {"cores": 1, "memory": "2 GB", "runtime": 300, "gpus": 0},
    "train": {"cores": 4, "memory": "8 GB", "runtime": 7200, "gpus": 1,
              "checkpoint_time": 110, "max_walltime": 120},
    "evaluate": {"cores": 2, "memory": "4 GB", "runtime": 1800, "gpus": 1},
    "predict": {"cores": 2, "memory": "4 GB", "runtime": 1800, "gpus": 1},
}

CONTAINER_TYPES = {"singularity": Container.SINGULARITY, "docker": Container.DOCKER}
CONTAINER_NAME = "mask-detection"
CONTAINER_GPU_ARGUMENTS = {"singularity": "--nv", "docker": "--gpus all"}

# Defaults sized so that `make run` (120 synthetic images, 2 cores) ends well within 15 minutes.
DEFAULTS = {
    "epochs": 2,
    "hpo_epochs": 1,
    "trials": 2,
    "hpo_jobs": 2,
    "image_size": 256,
    "backbone": "mobilenet_v2_fpn",
    "seed": 42,
    "augment_copies": 1,
    "rare_factor": 1,
    "noise_std": 8.0,
    "max_size": 640,
    "score_threshold": 0.5,
}


class ConfigError(ValueError):
    """A bad flag or configuration file, reported as one line (no traceback)."""


def validate_container_image(image: str) -> str:
    """Accept docker://OWNER/NAME:TAG (the planner needs the slash after docker://)."""
    prefix = "docker://"
    if not image.startswith(prefix):
        raise ConfigError(f"--container-image {image!r}: must start with docker:// (docker://OWNER/NAME:TAG)")
    rest = image[len(prefix):]
    if rest.startswith("/"):
        raise ConfigError(f"--container-image {image!r}: write docker://OWNER/NAME:TAG, not docker:///...")
    name, _, tag = rest.rpartition(":")
    if "/" not in rest or not name or "/" not in name or not tag or "/" in tag:
        raise ConfigError(f"--container-image {image!r}: expected docker://OWNER/NAME:TAG "
                          "(owner, a slash, the image name and a tag)")
    owner, _, repo = name.partition("/")
    if not owner or not repo:
        raise ConfigError(f"--container-image {image!r}: expected docker://OWNER/NAME:TAG")
    return image


def load_sites_config(path: Path) -> dict:
    """Read the user-editable sites.yml (not a Pegasus catalog) and check its shape."""
    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: sites configuration not found") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    config.setdefault("local", {})
    config.setdefault("sites", {})
    config.setdefault("container", {})
    for key in ("local", "sites", "container"):
        if not isinstance(config[key], dict):
            raise ConfigError(f"{path}: '{key}' must be a mapping")
    for name, site in config["sites"].items():
        if name == "local":
            raise ConfigError(f"{path}: 'local' is the submit host; configure it under 'local:'")
        if not isinstance(site, dict):
            raise ConfigError(f"{path}: site '{name}' must be a mapping")
        profiles = site.get("profiles") or {}
        if not isinstance(profiles, dict) or any(not isinstance(v, dict) for v in profiles.values()):
            raise ConfigError(f"{path}: site '{name}': profiles must map namespace -> key -> value")
        try:
            for namespace in profiles:
                Namespace(namespace)
        except ValueError:
            raise ConfigError(f"{path}: site '{name}': unknown profile namespace {namespace!r}") from None
    return config


def _enum(enum_type, value, where: str):
    if value is None:
        return None
    try:
        return enum_type(str(value).lower())
    except ValueError:
        choices = ", ".join(member.value for member in enum_type)
        raise ConfigError(f"{where}: {value!r} is not one of {choices}") from None


@dataclass
class SplitEntry:
    """One image/annotation pair and the set it belongs to (from split.csv)."""

    image: Path
    annotation: Path
    split: str


@dataclass
class WorkflowConfig:
    run_dir: Path
    split_csv: Path
    entries: list[SplitEntry]
    pred_images: list[Path]
    sites_config: dict
    properties_file: Path | None = None
    execution_site: str = "condorpool"
    container_type: str = "singularity"
    container_image: str = "docker://maskdetection/mask-detection-workflow:latest"
    epochs: int = DEFAULTS["epochs"]
    hpo_epochs: int = DEFAULTS["hpo_epochs"]
    trials: int = DEFAULTS["trials"]
    hpo_jobs: int = DEFAULTS["hpo_jobs"]
    image_size: int = DEFAULTS["image_size"]
    backbone: str = DEFAULTS["backbone"]
    seed: int = DEFAULTS["seed"]
    gpus: int = 0
    augment_copies: int = DEFAULTS["augment_copies"]
    rare_factor: int = DEFAULTS["rare_factor"]
    noise_std: float = DEFAULTS["noise_std"]
    max_size: int = DEFAULTS["max_size"]
    score_threshold: float = DEFAULTS["score_threshold"]
    weights_file: Path | None = None
    retries: int | None = None
    mode: str | None = None
    transfer_threads: int | None = None
    project_root: Path = ROOT
    property_overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        self.run_dir = Path(self.run_dir).resolve()
        if self.hpo_jobs < 1:
            raise ConfigError(f"--hpo-jobs {self.hpo_jobs}: need at least one HPO job")
        if self.trials < self.hpo_jobs:
            raise ConfigError(f"--trials {self.trials} is fewer than --hpo-jobs {self.hpo_jobs}: "
                              "every HPO job needs at least one trial")
        for name in ("epochs", "hpo_epochs", "image_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.gpus < 0:
            raise ConfigError("--gpus must be 0 or more")
        if self.container_type not in (*CONTAINER_TYPES, "none"):
            raise ConfigError(f"--container-type {self.container_type!r}: choose singularity, docker or none")
        if self.container_type != "none":
            validate_container_image(self.container_image)
        known_sites = {"local", *self.sites_config.get("sites", {})}
        if self.execution_site not in known_sites:
            raise ConfigError(f"--execution-site {self.execution_site!r}: not in sites.yml "
                              f"(known: {', '.join(sorted(known_sites))})")


class _SortedSet(set):
    """A set that iterates in sorted order, so that jobDependencies are written the same every time."""

    def __iter__(self):
        return iter(sorted(set.__iter__(self)))


def _absolute(path: Path) -> Path:
    """An absolute path without resolving symlinks (one resolve() per image is slow at 100k images)."""
    return Path(os.path.abspath(path))


def trials_per_worker(trials: int, workers: int) -> list[int]:
    """Spread *trials* over *workers* as evenly as possible (the first ones get the remainder)."""
    base, extra = divmod(trials, workers)
    return [base + (1 if index < extra else 0) for index in range(workers)]


class MaskDetectionWorkflow:
    """Builds the properties, the three catalogs and the DAG with Pegasus.api."""

    def __init__(self, config: WorkflowConfig):
        self.config = config
        self.run_dir = config.run_dir
        self.paths = {
            "workflow": self.run_dir / "workflow.yml",
            "sites": self.run_dir / "sites.yml",
            "transformations": self.run_dir / "transformations.yml",
            "replicas": self.run_dir / "replicas.yml",
            "properties": self.run_dir / "pegasus.properties",
            "dot": self.run_dir / "workflow.dot",
            "png": self.run_dir / "workflow.png",
        }
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.props: Properties | None = None
        self.sc: SiteCatalog | None = None
        self.tc: TransformationCatalog | None = None
        self.rc: ReplicaCatalog | None = None
        self.wf: Workflow | None = None
        self.transformations: dict[str, Transformation] = {}
        self.files: dict[str, File] = {}
        self.initial_checkpoints: dict[str, Path] = {}

    # -- helpers ------------------------------------------------------------
    def _input_file(self, path: Path) -> File:
        """The File for an input, named by its file name (Pegasus stages files flat)."""
        lfn = path.name
        known = self.files.get(lfn)
        if known is None:
            known = self.files[lfn] = File(lfn)
            self._replica_paths[lfn] = path
        elif self._replica_paths.get(lfn) != path:
            raise ConfigError(f"{path}: has the same file name as {self._replica_paths.get(lfn)}; "
                              "Pegasus stages files by name, so input file names must be unique")
        return known

    def _local_dir(self, key: str, default: str) -> Path:
        value = Path(self.config.sites_config.get("local", {}).get(key) or default).expanduser()
        return value if value.is_absolute() else self.run_dir / value

    def output_dir(self) -> Path:
        return self._local_dir("local_storage", "outputs")

    # -- properties ---------------------------------------------------------
    def create_properties(self) -> Properties:
        config = self.config
        props = Properties()
        if config.properties_file is not None:
            try:
                props = Properties.load(config.properties_file)
            except FileNotFoundError:
                raise ConfigError(f"{config.properties_file}: properties file not found") from None
        if config.retries is not None:
            props["dagman.retry"] = config.retries
        if config.mode is not None:
            props["pegasus.mode"] = config.mode
        if config.transfer_threads is not None:
            props["pegasus.transfer.threads"] = config.transfer_threads
        site = self.config.sites_config.get("sites", {}).get(config.execution_site, {})
        if config.execution_site == "local":
            # Jobs on the submit host read and write its file system directly.
            props["pegasus.data.configuration"] = "sharedfs"
        else:
            props["pegasus.data.configuration"] = site.get("data_configuration", "condorio")
        # The catalogs are not in the planner's working directory: name them.
        props["pegasus.catalog.site"] = "YAML"
        props["pegasus.catalog.site.file"] = str(self.paths["sites"])
        props["pegasus.catalog.transformation"] = "YAML"
        props["pegasus.catalog.transformation.file"] = str(self.paths["transformations"])
        props["pegasus.catalog.replica"] = "YAML"
        props["pegasus.catalog.replica.file"] = str(self.paths["replicas"])
        for key, value in config.property_overrides.items():
            props[key] = value
        self.props = props
        return props

    # -- site catalog --------------------------------------------------------
    def create_site_catalog(self) -> SiteCatalog:
        config = self.config.sites_config
        local_config = config.get("local", {})
        shared_scratch = self._local_dir("shared_scratch", "pegasus/scratch")
        local_storage = self.output_dir()
        local = Site(
            "local",
            arch=_enum(Arch, local_config.get("arch", "x86_64"), "sites.yml local.arch"),
            os_type=_enum(OS, local_config.get("os_type", "linux"), "sites.yml local.os_type"),
        ).add_directories(
            Directory(Directory.SHARED_SCRATCH, shared_scratch).add_file_servers(
                FileServer(shared_scratch.as_uri(), Operation.ALL)),
            Directory(Directory.LOCAL_STORAGE, local_storage).add_file_servers(
                FileServer(local_storage.as_uri(), Operation.ALL)),
        )
        sites = [local]
        for name, site_config in config.get("sites", {}).items():
            site = Site(
                name,
                arch=_enum(Arch, site_config.get("arch"), f"sites.yml sites.{name}.arch"),
                os_type=_enum(OS, site_config.get("os_type"), f"sites.yml sites.{name}.os_type"),
            )
            site.add_pegasus_profile(style="condor")
            site.add_condor_profile(universe="vanilla")
            if site_config.get("data_configuration"):
                site.add_pegasus_profile(data_configuration=site_config["data_configuration"])
            for namespace, values in (site_config.get("profiles") or {}).items():
                for key, value in values.items():
                    site.add_profiles(Namespace(namespace), key=str(key), value=value)
            sites.append(site)
        self.sc = SiteCatalog().add_sites(*sites)
        return self.sc

    # -- transformation catalog ----------------------------------------------
    def create_transformation_catalog(self) -> TransformationCatalog:
        config = self.config
        tc = TransformationCatalog()
        container = None
        if config.container_type != "none":
            container = Container(CONTAINER_NAME, CONTAINER_TYPES[config.container_type],
                                  image=config.container_image)
            tc.add_containers(container)
        for kind, script in JOB_SCRIPTS.items():
            pfn = (config.project_root / script).resolve()
            resources = RESOURCES[kind]
            transformation = Transformation(kind, site="local", pfn=pfn, is_stageable=True,
                                             container=container)
            transformation.add_pegasus_profile(cores=resources["cores"], memory=resources["memory"],
                                               runtime=str(resources["runtime"]))
            self.transformations[kind] = transformation
            tc.add_transformations(transformation)
        self.tc = tc
        return tc

    # -- replica catalog -----------------------------------------------------
    def create_replica_catalog(self) -> ReplicaCatalog:
        """Every input with an absolute file:// URL on the submit host ("local")."""
        self._replica_paths: dict[str, Path] = {}
        self.files = {}
        self.split_file = self._input_file(self.config.split_csv.resolve())
        self.split_files: dict[str, list[tuple[File, File]]] = {"train": [], "val": [], "test": []}
        for entry in self.config.entries:
            if entry.split not in self.split_files:
                raise ConfigError(f"{self.config.split_csv}: unknown split {entry.split!r} for {entry.image}")
            pair = (self._input_file(_absolute(entry.image)), self._input_file(_absolute(entry.annotation)))
            self.split_files[entry.split].append(pair)
        self.pred_files = [self._input_file(_absolute(path)) for path in self.config.pred_images]
        self.weights = None
        if self.config.weights_file is not None:
            self.weights = self._input_file(Path(self.config.weights_file).resolve())
        # condorio transfers a checkpoint file in with the job, so it must exist before
        # the first try: an empty file, which hpo and train read as "no checkpoint yet".
        self.initial_checkpoints = {f"hpo_{i}.journal": self.checkpoint_dir / f"hpo_{i}.journal"
                                    for i in range(self.config.hpo_jobs)}
        self.initial_checkpoints["train_checkpoint.pt"] = self.checkpoint_dir / "train_checkpoint.pt"
        for lfn, path in self.initial_checkpoints.items():
            self.files[lfn] = File(lfn)
            self._replica_paths[lfn] = path
        rc = ReplicaCatalog()
        for lfn, path in self._replica_paths.items():
            rc.add_replica("local", self.files[lfn], path.as_uri())
        self.rc = rc
        return rc

    # -- workflow ------------------------------------------------------------
    def _job(self, kind: str, job_id: str) -> Job:
        job = Job(self.transformations[kind], _id=job_id, node_label=job_id)
        resources = RESOURCES[kind]
        if resources["gpus"] and self.config.gpus > 0:
            job.add_pegasus_profile(gpus=self.config.gpus)
            requirements = (self.config.sites_config.get("sites", {})
                            .get(self.config.execution_site, {}).get("gpu_requirements"))
            if requirements:
                job.add_condor_profile(requirements=requirements)
            if self.config.container_type != "none":
                job.add_pegasus_profile(container_arguments=CONTAINER_GPU_ARGUMENTS[self.config.container_type])
        if "checkpoint_time" in resources:
            job.add_pegasus_profile(checkpoint_time=resources["checkpoint_time"],
                                    max_walltime=resources["max_walltime"])
        return job

    def create_workflow(self) -> Workflow:
        config = self.config
        wf = Workflow(WORKFLOW_NAME, infer_dependencies=True)
        split = self.split_file
        train, val, test = (self.split_files[name] for name in ("train", "val", "test"))
        for name, pairs in (("train", train), ("val", val), ("test", test)):
            if not pairs:
                raise ConfigError(f"{config.split_csv}: the {name} split is empty; add images or change --fractions")
        all_annotations = [annotation for pairs in (train, val, test) for _, annotation in pairs]

        plot = self._job("plot_class_distribution", "plot_class_distribution")
        plot.add_args("--split-csv", split, "--annotations", ".",
                      "--output", "class_distribution.png", "--output-csv", "class_distribution.csv")
        plot.add_inputs(split, *all_annotations)
        plot.add_outputs(File("class_distribution.png"), File("class_distribution.csv"),
                         File("class_distribution_run.json"), stage_out=True, register_replica=False)

        sets = {}
        preprocess_jobs = []
        for name, pairs in (("val", val), ("test", test)):
            job = self._job("preprocess", f"preprocess_{name}")
            sets[name] = File(f"{name}_set.tar")
            report = File(f"preprocess_{name}_report.json")
            job.add_args("--images", ".", "--annotations", ".", "--split-csv", split, "--split", name,
                         "--prefix", f"{name}_", "--max-size", config.max_size,
                         "--output-tar", sets[name], "--report", report)
            job.add_inputs(split, *(f for pair in pairs for f in pair))
            job.add_outputs(sets[name], stage_out=False, register_replica=False)
            job.add_outputs(report, stage_out=True, register_replica=False)
            preprocess_jobs.append(job)

        augment = self._job("augment", "augment_train")
        sets["train"] = File("train_set.tar")
        augment_report = File("augment_train_report.json")
        augment.add_args("--images", ".", "--annotations", ".", "--split-csv", split, "--split", "train",
                         "--copies", config.augment_copies, "--rare-factor", config.rare_factor,
                         "--noise-std", config.noise_std, "--seed", config.seed,
                         "--output-tar", sets["train"], "--report", augment_report)
        augment.add_inputs(split, *(f for pair in train for f in pair))
        augment.add_outputs(sets["train"], stage_out=False, register_replica=False)
        augment.add_outputs(augment_report, stage_out=True, register_replica=False)

        weights_args = ["--weights-file", self.weights] if self.weights is not None else []
        weights_inputs = [self.weights] if self.weights is not None else []
        hpo_jobs, best_files = [], []
        for index, n_trials in enumerate(trials_per_worker(config.trials, config.hpo_jobs)):
            job = self._job("hpo", f"hpo_{index}")
            best = File(f"best_{index}.json")
            journal = self.files[f"hpo_{index}.journal"]
            job.add_args("--train-images", sets["train"], "--train-annotations", sets["train"],
                         "--val-images", sets["val"], "--val-annotations", sets["val"],
                         "--epochs", config.hpo_epochs, "--image-size", config.image_size,
                         "--n-trials", n_trials, "--seed", config.seed,
                         "--worker-index", index, "--num-workers", config.hpo_jobs,
                         "--study-name", WORKFLOW_NAME, "--backbone", config.backbone,
                         *weights_args, "--checkpoint", journal, "--output", best)
            job.add_inputs(sets["train"], sets["val"], *weights_inputs)
            job.add_checkpoint(journal, stage_out=False, register_replica=False)
            job.add_outputs(best, stage_out=False, register_replica=False)
            job.add_outputs(File(f"best_{index}_run.json"), stage_out=True, register_replica=False)
            hpo_jobs.append(job)
            best_files.append(best)

        merge = self._job("hpo_merge", "hpo_merge")
        best_params = File("best_hpo_params.json")
        best_params_txt = File("best_hpo_params.txt")
        # The trials travel inside best_<i>.json: hpo_merge needs no journal, so no job reads
        # another job's checkpoint file (whose catalog entry is the empty initial file).
        merge.add_args("--inputs", *best_files,
                       "--output", best_params, "--output-txt", best_params_txt, "--plots-dir", ".")
        merge.add_inputs(*best_files)
        merge.add_outputs(best_params, best_params_txt, File("best_hpo_params_run.json"),
                          File("optimization_history.png"), File("param_importances.png"),
                          stage_out=True, register_replica=False)

        train_job = self._job("train", "train")
        model = File("model.pt")
        train_checkpoint = self.files["train_checkpoint.pt"]
        train_job.add_args("--images", sets["train"], "--annotations", sets["train"],
                           "--val-images", sets["val"], "--val-annotations", sets["val"],
                           "--params", best_params, "--epochs", config.epochs,
                           "--image-size", config.image_size, "--backbone", config.backbone,
                           *weights_args, "--checkpoint", train_checkpoint, "--output", model,
                           "--metrics-csv", "train_metrics.csv", "--loss-plot", "loss_curve.png",
                           "--seed", config.seed)
        train_job.add_inputs(sets["train"], sets["val"], best_params, *weights_inputs)
        train_job.add_checkpoint(train_checkpoint, stage_out=False, register_replica=False)
        train_job.add_outputs(model, File("model_run.json"), File("train_metrics.csv"), File("loss_curve.png"),
                              stage_out=True, register_replica=False)

        evaluate = self._job("evaluate", "evaluate")
        evaluate.add_args("--images", sets["test"], "--annotations", sets["test"], "--model", model,
                          "--output-dir", ".", "--score-threshold", config.score_threshold)
        evaluate.add_inputs(sets["test"], model)
        evaluate.add_outputs(*(File(name) for name in ("evaluation.json", "evaluation.txt",
                                                         "confusion_matrix.png", "confusion_matrix.csv",
                                                         "pr_curves.png", "evaluate_run.json")),
                             stage_out=True, register_replica=False)

        predict = self._job("predict", "predict")
        predict.add_args("--images", *self.pred_files, "--model", model, "--output-dir", ".",
                         "--annotated-dir", ".", "--score-threshold", config.score_threshold)
        predict.add_inputs(model, *self.pred_files)
        annotated_names = [f"annotated_{Path(f.lfn).stem}.jpg" for f in self.pred_files]
        if len(set(annotated_names)) != len(annotated_names):
            raise ConfigError("prediction images must have distinct file stems (the annotated copies "
                              "are named annotated_<stem>.jpg)")
        annotated = [File(name) for name in annotated_names]
        predict.add_outputs(File("predictions.json"), File("predictions.csv"), File("compliance.json"),
                            File("predict_run.json"), *annotated, stage_out=True, register_replica=False)

        wf.add_jobs(plot, *preprocess_jobs, augment, *hpo_jobs, merge, train_job, evaluate, predict)
        for job in wf.jobs.values():
            # Job.uses is a set (hash order varies between processes); a sorted list makes
            # workflow.yml identical from one generation to the next. Nothing is added after this.
            job.uses = sorted(job.uses, key=lambda use: (use._type, use.file.lfn))
        wf._infer_dependencies()
        for dependency in wf.dependencies.values():
            dependency.children_ids = _SortedSet(dependency.children_ids)
        self.wf = wf
        return wf

    # -- output --------------------------------------------------------------
    def build(self) -> "MaskDetectionWorkflow":
        self.create_properties()
        self.create_site_catalog()
        self.create_transformation_catalog()
        self.create_replica_catalog()
        self.create_workflow()
        return self

    def write(self, graph: bool = True) -> dict[str, Path]:
        """Write the catalogs, the workflow and the properties (each atomically) into the run dir."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        for path in self.initial_checkpoints.values():
            if not path.exists():
                path.touch()
        # Serialising builds millions of short-lived containers (JSON round trip, YAML nodes) and
        # no cycles: with the cyclic GC paused, 100,000 images write ~1.5x faster.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for key, catalog in (("sites", self.sc), ("transformations", self.tc), ("replicas", self.rc),
                                 ("workflow", self.wf)):
                with atomic_path(self.paths[key]) as tmp:
                    catalog.write(str(tmp))
                catalog._path = str(self.paths[key])  # Workflow.plan() reads the file from here
        finally:
            if gc_was_enabled:
                gc.enable()
        buffer = io.StringIO()
        self.props.write(buffer)
        write_text(self.paths["properties"], buffer.getvalue())
        written = {key: self.paths[key] for key in ("workflow", "sites", "transformations", "replicas",
                                                    "properties")}
        if graph:
            written.update(self.write_graph())
        return written

    def dependencies(self) -> dict[str, set[str]]:
        """Parent job ids of each job (inferred from files, as Workflow.write does)."""
        self.wf._infer_dependencies()
        parents = {job_id: set() for job_id in self.wf.jobs}
        for parent_id, dependency in self.wf.dependencies.items():
            for child in dependency.children_ids:
                parents[child].add(parent_id)
        return parents

    def write_graph(self) -> dict[str, Path]:
        """workflow.dot (jobs and the files passed between them); workflow.png when `dot` exists."""
        parents = self.dependencies()
        produced = {}
        for job_id, job in self.wf.jobs.items():
            for use in job.uses:
                if use._type in ("output", "checkpoint"):
                    produced[use.file.lfn] = job_id
        lines = [f'digraph "{WORKFLOW_NAME}" {{', "  rankdir=TB;",
                 '  node [shape=box, style="rounded,filled", fillcolor="#dbe9f6", fontname="Helvetica"];',
                 '  edge [fontname="Helvetica", fontsize=9];',
                 f'  inputs [shape=cylinder, fillcolor="#f3e3c3", label="replica catalog\\n{len(self.config.entries)} '
                 'image/annotation pairs"];']
        for job_id, job in self.wf.jobs.items():
            label = job_id if job_id == job.transformation else f"{job_id}\\n({job.transformation})"
            lines.append(f'  "{job_id}" [label="{label}"];')
        for job_id, job in self.wf.jobs.items():
            inputs = {use.file.lfn for use in job.uses if use._type == "input"}
            if any(lfn not in produced for lfn in inputs):
                lines.append(f'  inputs -> "{job_id}";')
            for parent in sorted(parents[job_id]):
                passed = sorted(lfn for lfn in inputs if produced.get(lfn) == parent)
                label = ", ".join(passed[:3]) + (f" +{len(passed) - 3}" if len(passed) > 3 else "")
                lines.append(f'  "{parent}" -> "{job_id}" [label="{label}"];')
        lines.append("}")
        write_text(self.paths["dot"], "\n".join(lines) + "\n")
        written = {"dot": self.paths["dot"]}
        dot = shutil.which("dot")
        if dot:
            with atomic_path(self.paths["png"]) as tmp:
                subprocess.run([dot, "-Tpng", str(self.paths["dot"]), "-o", str(tmp)], check=True,
                               capture_output=True)
            written["png"] = self.paths["png"]
        return written

    def plan_command(self, submit: bool = True) -> list[str]:
        """The exact pegasus-plan command line for this run directory."""
        from Pegasus.client._client import get_planner_args

        args = get_planner_args(conf=self.paths["properties"], sites=[self.config.execution_site],
                                output_sites=["local"], dir=self.run_dir / "submit", cleanup="leaf",
                                force=True, submit=submit)
        return ["pegasus-plan", *args, str(self.paths["workflow"])]


# -- the driver ---------------------------------------------------------------

def read_split_csv(path: Path, data_dir: Path) -> list[SplitEntry]:
    entries = []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            image, annotation = Path(row["image"]), Path(row["annotation"])
            if not image.is_absolute():
                image = data_dir / "images" / image.name
            if not annotation.is_absolute():
                annotation = data_dir / "annotations" / annotation.name
            entries.append(SplitEntry(image, annotation, row["split"]))
    return entries


def _write_if_changed(path: Path, text: str) -> None:
    """Rewrite only on change, so that an unchanged split keeps its file as it was."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    write_text(path, text)


def validate_and_split(data_dir: Path, run_dir: Path, seed: int, fractions, near_duplicate_distance: int):
    """Validate the data and split the clean pairs at generation time.

    Writes into the run dir: validation_report.json, clean_manifest.csv, annotations_clean/
    (annotations with the fixable problems fixed, which the jobs get) and split.csv.
    """
    from utils.data.split import SplitError, split_pairs
    from utils.data.validation import ValidationInputError, validate_dataset, write_clean_outputs

    images_dir, annotations_dir = data_dir / "images", data_dir / "annotations"
    for folder in (images_dir, annotations_dir):
        if not folder.is_dir():
            raise ConfigError(f"{folder}: not found (--data must contain images/ and annotations/)")
    try:
        result = validate_dataset(images_dir, annotations_dir, near_duplicate_distance=near_duplicate_distance)
        clean = write_clean_outputs(result, run_dir)
        if not clean["pairs"]:
            raise ConfigError(f"{data_dir}: no usable image/annotation pairs (see {clean['report']})")
        rows = split_pairs(clean["pairs"], result.duplicate_groups, fractions, seed)
    except (ValidationInputError, SplitError) as error:
        raise ConfigError(str(error)) from None
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["image", "annotation", "split"], extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: str(value) if isinstance(value, Path) else value for key, value in row.items()})
    split_path = run_dir / "split.csv"
    _write_if_changed(split_path, buffer.getvalue())
    return result.report, split_path


def find_images(folder: Path) -> list[Path]:
    from utils.data.images import is_image_name

    if not folder.is_dir():
        raise ConfigError(f"{folder}: --pred-images folder not found")
    images = sorted(p for p in folder.iterdir() if p.is_file() and is_image_name(p))
    if not images:
        raise ConfigError(f"{folder}: no images to predict on")
    return images


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default in --help."""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, default=ROOT / "data" / "sample",
                      help="folder with images/ and annotations/ (Pascal VOC)")
    data.add_argument("--pred-images", type=Path, default=None,
                      help="folder of images to predict on (default: the test split's images)")
    data.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "workflow",
                      help="where the workflow, catalogs, logs and outputs go")
    data.add_argument("--fractions", type=float, nargs=3, default=(0.7, 0.1, 0.2), metavar=("TRAIN", "VAL", "TEST"),
                      help="split fractions")
    data.add_argument("--near-duplicate-distance", type=int, default=4,
                      help="perceptual-hash distance under which images count as near duplicates "
                           "(kept in one split)")
    model = parser.add_argument_group("model and training")
    model.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="training epochs of the final model")
    model.add_argument("--hpo-epochs", type=int, default=DEFAULTS["hpo_epochs"], help="epochs per HPO trial")
    model.add_argument("--trials", type=int, default=DEFAULTS["trials"],
                       help="HPO trials in total, spread over the HPO jobs")
    model.add_argument("--hpo-jobs", type=int, default=DEFAULTS["hpo_jobs"], help="parallel HPO jobs (K)")
    model.add_argument("--backbone", default=DEFAULTS["backbone"], help="detector backbone (see bin/train.py)")
    model.add_argument("--image-size", type=int, default=DEFAULTS["image_size"],
                       help="longest image side the detector works at")
    model.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed for split, augmentation, HPO, training")
    model.add_argument("--augment-copies", type=int, default=DEFAULTS["augment_copies"],
                       help="augmented copies per training image")
    model.add_argument("--rare-factor", type=int, default=DEFAULTS["rare_factor"],
                       help="extra augmented copies of each image with the rare class (mask_weared_incorrect)")
    model.add_argument("--noise-std", type=float, default=DEFAULTS["noise_std"], help="Gaussian noise std (0-255 scale)")
    model.add_argument("--max-size", type=int, default=DEFAULTS["max_size"], help="preprocess: longest side in pixels")
    model.add_argument("--score-threshold", type=float, default=DEFAULTS["score_threshold"],
                       help="detection score threshold for evaluation and prediction")
    model.add_argument("--no-pretrained", action="store_true",
                       help="do not pass the cached ImageNet MobileNetV2 weights to hpo/train")
    pegasus = parser.add_argument_group("Pegasus")
    pegasus.add_argument("--gpus", type=int, default=0, help="GPUs per hpo/train/evaluate/predict job (0: CPU only)")
    pegasus.add_argument("--container-type", choices=["singularity", "docker", "none"], default=None,
                         help="container for every job (default: sites.yml container.type)")
    pegasus.add_argument("--container-image", default=None,
                         help="docker://OWNER/NAME:TAG (default: sites.yml container.image)")
    pegasus.add_argument("--execution-site", default=None, help="site the jobs run on (default: sites.yml)")
    pegasus.add_argument("--sites-config", type=Path, default=ROOT / "sites.yml",
                         help="user-editable site configuration")
    pegasus.add_argument("--properties", type=Path, default=ROOT / "properties.conf",
                         help="Pegasus properties merged with the flags")
    pegasus.add_argument("--retries", type=int, default=None, help="dagman.retry (default: properties.conf)")
    pegasus.add_argument("--mode", default=None, help="pegasus.mode (default: properties.conf)")
    pegasus.add_argument("--transfer-threads", type=int, default=None,
                         help="pegasus.transfer.threads (default: properties.conf)")
    run = parser.add_argument_group("running")
    how = run.add_mutually_exclusive_group()
    how.add_argument("--local", action="store_true",
                     help="run the workflow on this machine with utils/pegasus/executor.py "
                          "(default when pegasus-plan is not installed)")
    how.add_argument("--submit", action="store_true", help="plan and submit with pegasus-plan")
    how.add_argument("--generate-only", action="store_true", help="write the workflow and catalogs, run nothing")
    run.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                     help="local executor: jobs at once")
    run.add_argument("-v", "--verbose", action="store_true", help="log more")
    return parser


def build_config(args, entries: list[SplitEntry], split_csv: Path, pred_images: list[Path]) -> WorkflowConfig:
    sites_config = load_sites_config(args.sites_config)
    container = sites_config.get("container", {})
    weights_file = None
    if not args.no_pretrained:
        from utils.detection.weights import cached_weights

        weights_file = cached_weights()
    return WorkflowConfig(
        run_dir=args.run_dir, split_csv=split_csv, entries=entries, pred_images=pred_images,
        sites_config=sites_config,
        properties_file=args.properties if args.properties and args.properties.exists() else None,
        execution_site=args.execution_site or sites_config.get("execution_site", "condorpool"),
        container_type=args.container_type or container.get("type", "singularity"),
        container_image=args.container_image or container.get("image", WorkflowConfig.container_image),
        epochs=args.epochs, hpo_epochs=args.hpo_epochs, trials=args.trials, hpo_jobs=args.hpo_jobs,
        image_size=args.image_size, backbone=args.backbone, seed=args.seed, gpus=args.gpus,
        augment_copies=args.augment_copies, rare_factor=args.rare_factor, noise_std=args.noise_std,
        max_size=args.max_size, score_threshold=args.score_threshold, weights_file=weights_file,
        retries=args.retries, mode=args.mode, transfer_threads=args.transfer_threads,
    )


def print_summary(run_dir: Path, output_dir: Path) -> None:
    """The evaluation summary, the compliance line and where the results are."""
    import json

    evaluation, compliance = output_dir / "evaluation.json", output_dir / "compliance.json"
    if evaluation.is_file():
        text_summary = output_dir / "evaluation.txt"
        print("\n== Evaluation (test split) ==")
        if text_summary.is_file():
            print(text_summary.read_text(encoding="utf-8").rstrip())
        else:
            print(json.dumps(json.loads(evaluation.read_text(encoding="utf-8")), indent=2)[:2000])
    if compliance.is_file():
        from utils.detection.metrics import compliance_line

        data = json.loads(compliance.read_text(encoding="utf-8"))
        print("\n== Compliance (predicted images) ==")
        try:
            print(f"{compliance_line(data['overall'])} ({data.get('num_images', '?')} images)")
        except (KeyError, TypeError):
            print(f"{compliance}: no overall summary in it")
    print(f"\nResults: {output_dir}")
    print(f"Statistics: {run_dir / 'statistics.txt'}  Logs: {run_dir / 'logs'}")


def main(args) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    started = time.perf_counter()
    run_dir = args.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    data_dir = args.data.resolve()
    try:
        report, split_csv = validate_and_split(data_dir, run_dir, args.seed, tuple(args.fractions),
                                               args.near_duplicate_distance)
        entries = read_split_csv(split_csv, data_dir)
        pred_images = (find_images(args.pred_images.resolve()) if args.pred_images
                       else [entry.image for entry in entries if entry.split == "test"])
        config = build_config(args, entries, split_csv, pred_images)
        generator = MaskDetectionWorkflow(config).build()
        written = generator.write()
    except ConfigError as error:
        print(f"workflow.py: {error}", file=sys.stderr)
        return 2
    counts = {name: sum(1 for e in entries if e.split == name) for name in ("train", "val", "test")}
    print(f"Validated {data_dir}: {report.get('images_usable', len(entries))} usable of "
          f"{report.get('images_total', '?')} images (report: {run_dir / 'validation_report.json'})")
    print(f"Split: train {counts['train']}, val {counts['val']}, test {counts['test']}; "
          f"predicting on {len(pred_images)} images")
    print(f"Workflow: {len(generator.wf.jobs)} jobs ({config.hpo_jobs} HPO) written to {run_dir} "
          f"in {time.perf_counter() - started:.1f}s: " + ", ".join(p.name for p in written.values()))

    has_planner = shutil.which("pegasus-plan") is not None
    if args.submit:
        return submit(generator, has_planner)
    if args.generate_only or (has_planner and not args.local):
        command = " ".join(shlex.quote(part) for part in generator.plan_command())
        print(f"To plan and submit:\n  {command}")
        return 0

    from utils.pegasus.executor import run_workflow

    status = run_workflow(run_dir, jobs=args.jobs)
    if status == 0:
        print_summary(run_dir, generator.output_dir())
    elif status != 2:
        print(f"\nThe workflow did not finish (see {run_dir / 'statistics.txt'} and the logs in "
              f"{run_dir / 'logs'}); run the same command again to resume it.", file=sys.stderr)
    return status


def submit(generator: MaskDetectionWorkflow, has_planner: bool) -> int:
    command = " ".join(shlex.quote(part) for part in generator.plan_command())
    if not has_planner:
        print("pegasus-plan is not on PATH: this machine is not a Pegasus submit host.\n"
              "Copy the project and the run directory to one (e.g. ACCESS Pegasus) and run:\n"
              f"  {command}\n"
              "or run the same workflow here with --local.", file=sys.stderr)
        return 3
    from Pegasus.api import PegasusClientError

    try:
        generator.wf.plan(conf=generator.paths["properties"], sites=[generator.config.execution_site],
                          output_sites=["local"], dir=generator.run_dir / "submit", cleanup="leaf",
                          force=True, submit=True)
    except PegasusClientError as error:
        print(f"pegasus-plan failed:\n{error.output}", file=sys.stderr)
        return 1
    submit_dir = generator.wf.braindump.submit_dir
    print(f"Submitted. Follow it with:\n  pegasus-status -l {submit_dir}\n"
          f"  pegasus-analyzer {submit_dir}     # when something fails\n"
          f"  pegasus-statistics -s all {submit_dir}   # when it is done")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
