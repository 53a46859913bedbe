"""What the generator is given: the user's sites.yml, the container image and the run's settings.

Everything here is checked before a catalog is built, and a problem is one line
(ConfigError) naming the file or flag, never a traceback.
"""

from __future__ import annotations

import configparser
import difflib
import logging
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath

import yaml
from Pegasus.api import OS, Arch, Namespace, Properties

from .. import defaults as D, safe_yaml
from ..classes import LabelMap, LabelMapError
from ..detection.stages import Stage, StagesError, parse_stages, total_epochs
from ..errors import InputError, shown

log = logging.getLogger(__name__)

CONTAINER_KINDS = ("singularity", "docker")
DEFAULT_CONTAINER_IMAGE = D.CONTAINER_IMAGE
# What Pegasus 5 accepts for pegasus.data.configuration (a site's data_configuration) and for pegasus.mode.
DATA_CONFIGURATIONS = ("sharedfs", "nonsharedfs", "condorio")
# A pool site's catalog entry has no shared-scratch directory or staging site: these two cannot be planned there.
SHARED_SCRATCH_CONFIGURATIONS = ("sharedfs", "nonsharedfs")
PEGASUS_MODES = ("production", "development", "tutorial", "debug")
# The keys of the user's sites.yml: at the top, under local:, under each site of sites:, under container:.
# local: holds what a site may hold for --execution-site local, but no data_configuration (local is sharedfs)
# or profiles; it also names the submit host's scratch and output folders.
SITE_KEYS = ("arch", "os_type", "data_configuration", "gpu_requirements", "software_dir", "runtimes",
             "max_job_minutes", "profiles")
SITES_KEYS = {"": ("execution_site", "local", "sites", "container"),
              "local": ("shared_scratch", "local_storage", "arch", "os_type", "gpu_requirements", "software_dir",
                        "runtimes", "max_job_minutes"),
              "container": ("type", "image")}


class ConfigError(InputError):
    """A bad flag or configuration file, reported as one line (no traceback)."""


def validate_container_image(image: str, where: str = "--container-image") -> str:
    """Accept docker://OWNER/NAME:TAG (the planner needs the slash after docker://); errors start with *where*."""
    prefix = "docker://"
    if not isinstance(image, str) or not image.startswith(prefix):
        raise ConfigError(f"{where} {shown(image)}: must start with docker:// (docker://OWNER/NAME:TAG)")
    rest = image[len(prefix):]
    if rest.startswith("/"):
        raise ConfigError(f"{where} {shown(image)}: write docker://OWNER/NAME:TAG, not docker:///...")
    name, _, tag = rest.rpartition(":")
    if "/" not in rest or not name or "/" not in name or not tag or "/" in tag:
        raise ConfigError(f"{where} {shown(image)}: expected docker://OWNER/NAME:TAG "
                          "(owner, a slash, the image name and a tag)")
    owner, _, repo = name.partition("/")
    if not owner or not repo:
        raise ConfigError(f"{where} {shown(image)}: expected docker://OWNER/NAME:TAG")
    return image


def did_you_mean(key: str, known, otherwise: str) -> str:
    """" (did you mean KNOWN?)" for the known name closest to *key*, else " (*otherwise*)": the hint of an
    unknown key in an experiment file or sites.yml."""
    guess = difflib.get_close_matches(key.replace("-", "_"), list(known), n=1)
    return f" (did you mean {guess[0]}?)" if guess else f" ({otherwise})"


def parse_label_map(text: str) -> LabelMap:
    """--label-map as a LabelMap; a bad value is a ConfigError (one line naming the flag and the pair)."""
    try:
        return LabelMap.parse(text)
    except LabelMapError as error:
        raise ConfigError(str(error)) from None


def unreadable(error: OSError | UnicodeDecodeError) -> str:
    """Why a file could not be read, in a few words ("Is a directory", "not UTF-8 text")."""
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text: byte {error.start}"
    return error.strerror or str(error)


def _named(name) -> str:
    """A sites.yml key or site name as an error shows it: as written when short text, else bounded (shown)."""
    return name if isinstance(name, str) and 0 < len(name) <= 60 and name.isprintable() else shown(name)


def _check_keys(path, mapping: dict, known, where: str) -> None:
    """Every key of *mapping* (the entry *where*: "", "local", "sites.NAME", "container") is one of *known*:
    a misspelt key (max_job_minute) must not be silently ignored."""
    for key in mapping:
        if key not in known:
            hint = did_you_mean(str(key), known, "one of " + ", ".join(known))
            raise ConfigError(f"{path}: {where + '.' if where else ''}{_named(key)}: unknown key{hint}")


def _check_site(path, name: str, site: dict) -> None:
    """The values of one site entry (or local:) that need no flag: arch, os_type, data_configuration, the text
    values, the profiles, and the shape of runtimes: and max_job_minutes (utils/pegasus/runtimes.py)."""
    from .runtimes import check_site_limits, job_kinds

    where = f"{path}: {name}"
    for key, kind in (("arch", Arch), ("os_type", OS)):
        enum_value(kind, site.get(key), f"{where}.{key}")
    configuration = site.get("data_configuration")
    if configuration is not None and configuration not in DATA_CONFIGURATIONS:
        raise ConfigError(f"{where}.data_configuration: {shown(configuration)} is not one of "
                          f"{', '.join(DATA_CONFIGURATIONS)}")
    for key in ("shared_scratch", "local_storage", "gpu_requirements", "software_dir"):
        if site.get(key) is not None and not isinstance(site[key], str):
            raise ConfigError(f"{where}.{key}: {shown(site[key])} is not text")
    profiles = site.get("profiles") or {}
    if not isinstance(profiles, dict) or any(not isinstance(v, dict) for v in profiles.values()):
        raise ConfigError(f"{where}.profiles: must map namespace -> key -> value")
    try:
        for namespace in profiles:
            Namespace(namespace)
    except ValueError:
        raise ConfigError(f"{where}.profiles: unknown profile namespace {shown(namespace)}") from None
    check_site_limits(site, job_kinds(), where)


def load_sites_config(path: Path) -> dict:
    """Read the user-editable sites.yml (not a Pegasus catalog) and check its shape, its keys and every value
    that needs no flag (a site's runtimes: kinds need --folds: WorkflowSettings checks them)."""
    try:
        config = safe_yaml.load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: sites configuration not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read the sites configuration ({unreadable(error)})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    _check_keys(path, config, SITES_KEYS[""], "")
    for key in ("local", "sites", "container"):
        if config.get(key) is None:
            config[key] = {}
        if not isinstance(config[key], dict):
            raise ConfigError(f"{path}: '{key}' must be a mapping")
    for key in ("local", "container"):
        _check_keys(path, config[key], SITES_KEYS[key], key)
    for name, site in config["sites"].items():
        if name == "local":
            raise ConfigError(f"{path}: 'local' is the submit host; configure it under 'local:'")
        if not isinstance(site, dict):
            raise ConfigError(f"{path}: site {shown(name)} must be a mapping")
        _check_keys(path, site, SITE_KEYS, f"sites.{_named(name)}")
        _check_site(path, f"sites.{_named(name)}", site)
    _check_site(path, "local", config["local"])
    return config


def load_properties(path: Path) -> Properties:
    """A Pegasus properties file (--properties) as Pegasus.api reads it, with a pegasus.mode Pegasus knows;
    ConfigError naming the file when it is missing, unreadable or not a properties file."""
    try:
        props = Properties.load(Path(path))
    except FileNotFoundError:
        raise ConfigError(f"{path}: properties file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read the properties file ({unreadable(error)})") from None
    except configparser.Error as error:
        problem = " ".join(str(error).split())
        raise ConfigError(f"{path}: not a properties file of key = value lines ({shown(problem)})") from None
    try:
        mode = props["pegasus.mode"]
    except KeyError:
        mode = None
    check_mode(mode, f"{path}: pegasus.mode")
    # The values the flags set (--retries, --transfer-threads): DAGMan's RETRY and the local executor take a count
    for key, least in (("dagman.retry", 0), ("pegasus.transfer.threads", 1)):
        try:
            value = props[key]
        except KeyError:
            continue
        if not (re.fullmatch(r"[0-9]+", str(value).strip()) and int(value) >= least):  # ASCII: DAGMan reads it
            raise ConfigError(f"{path}: {key} {shown(value)}: not a whole number of at least {least}")
    return props


def check_mode(mode, where: str) -> None:
    """A pegasus.mode value (None: not set) is one Pegasus 5 knows."""
    if mode is not None and mode not in PEGASUS_MODES:
        raise ConfigError(f"{where} {shown(mode)}: not one of {', '.join(PEGASUS_MODES)}")


def enum_value(enum_type, value, where: str):
    """*value* as a member of a Pegasus.api enum (Arch, OS), or a ConfigError naming *where*."""
    if value is None:
        return None
    try:
        return enum_type(str(value).lower())
    except ValueError:
        choices = ", ".join(member.value for member in enum_type)
        raise ConfigError(f"{where}: {shown(value)} is not one of {choices}") from None


def trials_per_worker(trials: int, workers: int) -> list[int]:
    """Spread *trials* over *workers* as evenly as possible (the first ones get the remainder)."""
    base, extra = divmod(trials, workers)
    return [base + (1 if index < extra else 0) for index in range(workers)]


@dataclass
class SplitEntry:
    """One image/annotation pair and the set it belongs to (from split.csv)."""

    image: Path
    annotation: Path
    split: str


@dataclass(frozen=True)
class ShardFile:
    """One shard (a .tar of images, with their XML for a data split) and how many images it holds."""

    path: Path
    images: int

    @property
    def tag(self) -> str:
        """Names a prediction shard's predict job and its outputs (predictions_<tag>.json)."""
        return self.path.stem


@dataclass(frozen=True)
class VideoFile:
    """One video of --pred-videos and its frame count (from its header, else utils.pegasus.inputs.video_frames's
    count or estimate)."""

    path: Path
    frames: int

    @property
    def tag(self) -> str:
        """Names the video's job and outputs: the file stem, with anything but ASCII letters, digits, - and _ as _,
        and a leading - as _ (the job gets --output-tag TAG, which argparse would read as a flag)."""
        tag = "".join(c if (c.isascii() and c.isalnum()) or c in "-_" else "_" for c in self.path.stem)
        return "_" + tag[1:] if tag.startswith("-") else tag


def check_video_tags(videos: list[VideoFile]) -> None:
    """Each video names its job and outputs by its tag: two videos of --pred-videos may not share one."""
    seen: dict[str, Path] = {}
    for video in videos:
        if video.tag in seen:
            raise ConfigError(f"--pred-videos: {seen[video.tag].name} and {video.path.name} have the same name once "
                              f"reduced to letters, digits, - and _ ({video.tag})")
        seen[video.tag] = video.path


@dataclass(kw_only=True)
class WorkflowSettings:
    """The run's settings, resolved (sites.yml's choices, the stages parsed, the cached weights) and checked
    on creation: every check that needs no data, so that a bad value stops the run before a file is written.
    Defaults are utils/defaults.py's."""

    sites_config: dict
    project_root: Path
    properties_file: Path | None = None
    execution_site: str = D.EXECUTION_SITE
    container_type: str = D.CONTAINER_TYPE
    container_image: str = DEFAULT_CONTAINER_IMAGE
    epochs: int = D.EPOCHS
    time_budget: float | None = D.TIME_BUDGET  # minutes of the train job; replaces epochs when set
    # Staged training of the train job: a list of mappings, JSON text or a .json/.yml path (--train-stages),
    # parsed into Stages (utils.detection.stages); replaces epochs. None: one stage of epochs.
    train_stages: list[Stage] | list[dict] | str | None = D.STAGES
    hpo_epochs: int = D.HPO_EPOCHS
    trials: int = D.HPO_TRIALS
    hpo_jobs: int = D.HPO_JOBS
    image_size: int = D.IMAGE_SIZE
    backbone: str = D.BACKBONE
    seed: int = D.SEED
    gpus: int = D.GPUS
    augment_copies: int = D.AUGMENT_COPIES
    rare_factor: int = D.RARE_FACTOR
    noise_std: float = D.NOISE_STD
    max_size: int | None = D.PREPROCESS_MAX_SIZE
    annotate_max: int = D.ANNOTATE_MAX
    video_stride: int = D.VIDEO_STRIDE
    score_threshold: float | None = None  # None: the model's own, chosen by train on the validation split
    label_map: str = D.LABEL_MAP  # --label-map text, handed to the jobs that read XML when not empty
    weights_file: Path | None = None
    retries: int | None = None
    mode: str | None = None
    transfer_threads: int | None = None
    property_overrides: dict = field(default_factory=dict)
    # Setting -> the experiment file that gave it (workflow.py --config): errors name "FILE: setting:" for
    # these, the flag for the others.
    setting_sources: dict[str, str] = field(default_factory=dict)
    # The user's sites.yml (--sites-config), which its errors name, and setting -> its sites.yml key for the
    # settings it gave (execution_site, container.type, container.image) where no flag or file did.
    sites_file: str = "sites.yml"
    site_sources: dict[str, str] = field(default_factory=dict)
    folds: int = D.FOLDS  # k-fold cross-validation on the train+val pool; 0: none
    fold_ensemble: bool = False  # predict and predict_video use the fold models as one ensemble (box fusion)

    def __post_init__(self):
        # Checked, and written one way (no spaces around "=" and ","), as the jobs' arguments get it.
        self.label_map = str(parse_label_map(self.label_map))
        if self.hpo_jobs < 1:
            raise ConfigError(f"{self.label('hpo_jobs')} {shown(self.hpo_jobs)}: need at least one HPO job")
        if self.folds == 1 or self.folds < 0:
            raise ConfigError(f"{self.label('folds')} {shown(self.folds)}: use 0 (no cross-validation) "
                              "or 2 or more folds")
        if self.fold_ensemble and not self.folds:
            raise ConfigError("--fold-ensemble predicts with the fold models: add --folds K (K >= 2)")
        if self.trials < self.hpo_jobs:
            # hpo_jobs named with its file where another source than trials' gave it
            source = self.setting_sources.get("hpo_jobs")
            origin = f" (from {source})" if source and source != self.setting_sources.get("trials") else ""
            raise ConfigError(f"{self.label('trials')} {shown(self.trials)} is fewer than {self.key('hpo_jobs')} "
                              f"{shown(self.hpo_jobs)}{origin}: every HPO job needs at least one trial")
        for name in ("epochs", "hpo_epochs", "image_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{self.label(name)} {shown(getattr(self, name))}: must be at least 1")
        if self.time_budget is not None and not (math.isfinite(self.time_budget) and self.time_budget > 0):
            raise ConfigError(f"{self.label('time_budget')} {self.time_budget:g}: must be a positive number of minutes")
        if isinstance(self.train_stages, str) and not self.train_stages.strip():
            # not "no stages": config.yml would record '' and could not be replayed
            raise ConfigError(f"{self.label('train_stages')} empty: give a JSON list of stages or a .json/.yml "
                              "file of them, or leave it out for one stage of --epochs")
        if self.train_stages is not None and not all(isinstance(stage, Stage) for stage in self.train_stages):
            try:
                self.train_stages = parse_stages(self.train_stages, self.key("train_stages"))
            except StagesError as error:
                raise ConfigError(str(error)) from None
        if self.annotate_max < 0:
            raise ConfigError(f"{self.label('annotate_max')} {shown(self.annotate_max)}: must be 0 or more")
        if self.video_stride < 1:
            raise ConfigError(f"{self.label('video_stride')} {shown(self.video_stride)}: must be at least 1")
        if self.gpus < 0:
            raise ConfigError(f"{self.label('gpus')} {shown(self.gpus)}: must be 0 or more")
        if self.container_type not in (*CONTAINER_KINDS, "none"):
            raise ConfigError(f"{self.label('container_type')} {shown(self.container_type)}: "
                              "choose singularity, docker or none")
        if self.container_type != "none":
            validate_container_image(self.container_image, self.label("container_image"))
        if self.execution_site == "local" and self.container_type != "none":
            # On the submit host Pegasus uses sharedfs and launches jobs with plain kickstart, not
            # PegasusLite, so the container would silently not be used.
            raise ConfigError(f"{self.label('execution_site')} local runs jobs without a container (Pegasus' "
                              f"sharedfs mode); add --container-type none, or choose a pool site for "
                              f"{self.label('container_type')} {self.container_type}")
        known_sites = {"local", *self.sites_config.get("sites", {})}
        if not isinstance(self.execution_site, str) or self.execution_site not in known_sites:
            raise ConfigError(f"{self.label('execution_site')} {shown(self.execution_site)}: not a site of "
                              f"{self.sites_file} (known: {', '.join(sorted(known_sites))})")
        configuration = self.execution_site_config().get("data_configuration")
        if configuration in SHARED_SCRATCH_CONFIGURATIONS:  # the planner's 'File Server not specified' else
            # the execution site's only: the planner plans no other, and a sites.yml may list sites for other runs
            raise ConfigError(f"{self.site_where()}.data_configuration: {shown(configuration)} needs a shared scratch "
                              "folder (and for nonsharedfs a staging site) that the generated site catalog does not "
                              "give a pool site; use condorio: HTCondor moves each job's files, no shared file system "
                              "needed")
        check_mode(self.mode, self.label("mode"))
        self.software_dir()
        from .runtimes import check_site_limits, job_kinds

        check_site_limits(self.execution_site_config(), job_kinds(), self.site_where())

    def key(self, name: str) -> str:
        """How an error names setting *name*: its key where an experiment file gave it, else its flag."""
        return name if name in self.setting_sources else f"--{name.replace('_', '-')}"

    def label(self, name: str) -> str:
        """What an error about setting *name* starts with: "FILE: name:" where an experiment file gave
        it, "SITES: key:" where sites.yml did, else the flag ("--name")."""
        source = self.setting_sources.get(name)
        if source:
            return f"{source}: {name}:"
        if name in self.site_sources:
            return f"{self.sites_file}: {self.site_sources[name]}:"
        return self.key(name)

    def site_where(self) -> str:
        """How errors name the execution site's entry of sites.yml: "SITES: sites.NAME" or "SITES: local"."""
        return f"{self.sites_file}: " + ("local" if self.execution_site == "local" else f"sites.{self.execution_site}")

    @property
    def train_epochs(self) -> int:
        """Epochs of the train job: the stages' total when staged, else epochs."""
        return total_epochs(self.train_stages) if self.train_stages else self.epochs

    def execution_site_config(self) -> dict:
        """The sites.yml entry of the execution site (the local: entry for local)."""
        if self.execution_site == "local":
            return self.sites_config.get("local", {})
        return self.sites_config.get("sites", {}).get(self.execution_site, {})

    def software_dir(self) -> PurePosixPath:
        """Where the execution site's nodes find this project, for --container-type none: sites.yml
        software_dir, else this project folder (right on a shared file system)."""
        configured = self.execution_site_config().get("software_dir")
        if configured is None:
            return PurePosixPath(Path(self.project_root).resolve().as_posix())
        if not str(configured).startswith("/"):
            raise ConfigError(f"{self.site_where()}.software_dir: {shown(configured)} must be an absolute path on "
                              "that site's nodes")
        return PurePosixPath(str(configured))


@dataclass(kw_only=True)
class WorkflowConfig(WorkflowSettings):
    """Everything the generator needs: the settings and the data they were applied to (the split, the
    shards, the videos, the folds), checked on creation."""

    run_dir: Path
    split_csv: Path
    entries: list[SplitEntry]
    pred_shards: list[ShardFile]
    # split -> its shards, when the data set is large enough to travel in shards (--shard-data-above);
    # None: every image and annotation is its own replica
    data_shards: dict[str, list[ShardFile]] | None = None
    pred_videos: list[VideoFile] = field(default_factory=list)
    folds_csv: Path | None = None  # RUN_DIR/folds.csv (image, fold), written at generation time
    # The run's settings every job receives as experiment_config.yml and records in its run record
    # (utils/pegasus/experiment.py); None: the jobs get no such file.
    experiment_settings: dict | None = None

    def __post_init__(self):
        super().__post_init__()
        self.run_dir = Path(self.run_dir).resolve()
        if self.folds and self.folds_csv is None:
            raise ConfigError(f"--folds {self.folds}: no folds.csv was written (a bug in the generator)")
        check_video_tags(self.pred_videos)
        if not self.pred_shards:
            raise ConfigError("no images to predict on")
        if len({shard.tag for shard in self.pred_shards}) != len(self.pred_shards):
            raise ConfigError("prediction shards must have distinct file names")

    @classmethod
    def from_settings(cls, settings: WorkflowSettings, **data) -> WorkflowConfig:
        """The config of *settings* applied to *data* (run_dir, split_csv, entries, pred_shards, ...)."""
        return cls(**{item.name: getattr(settings, item.name) for item in fields(WorkflowSettings)}, **data)


def check_data_flags(args, label) -> None:
    """The checks of workflow.py's flags that only the driver reads (the split, the shards, the local jobs);
    *label* names a setting as WorkflowSettings.label does."""
    from ..data.split import SplitError, check_fractions

    try:
        check_fractions(args.fractions)
    except SplitError:
        raise ConfigError(f"{label('fractions')} {' '.join(f'{value:g}' for value in args.fractions)}: "
                          "must be non-negative with a positive sum") from None
    for name, least in (("images_per_job", 1), ("near_duplicate_distance", -1), ("shard_data_above", 0)):
        if getattr(args, name) < least:
            raise ConfigError(f"{label(name)} {shown(getattr(args, name))}: must be at least {least}")
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError(f"{label('jobs')} {shown(args.jobs)}: must be at least 1")


def settings_from_args(args, project_root: Path) -> WorkflowSettings:
    """workflow.py's flags resolved (sites.yml fills what they leave open, the backbone's cached weights) and
    checked: every check that needs no data runs here, before the generator writes anything."""
    sites_config = load_sites_config(args.sites_config)
    container = sites_config.get("container", {})
    # A properties file is read whole now, the default one too: a missing one is refused, not skipped.
    if args.properties is not None:
        load_properties(args.properties)
    # Which settings an experiment file gave (ExperimentArgumentParser): their errors name the file and key.
    source = getattr(args, "experiment", None)
    setting_sources = source.setting_sources() if source is not None else {}
    # ... and which sites.yml gave, for the flags left open
    site_sources = {name: key for name, key, flag, given in (
        ("execution_site", "execution_site", args.execution_site, "execution_site" in sites_config),
        ("container_type", "container.type", args.container_type, "type" in container),
        ("container_image", "container.image", args.container_image, "image" in container)) if given and not flag}
    settings = WorkflowSettings(
        sites_config=sites_config, project_root=project_root, properties_file=args.properties,
        sites_file=str(args.sites_config), site_sources=site_sources,
        execution_site=args.execution_site or sites_config.get("execution_site", D.EXECUTION_SITE),
        container_type=args.container_type or container.get("type", D.CONTAINER_TYPE),
        container_image=args.container_image or container.get("image", DEFAULT_CONTAINER_IMAGE),
        epochs=args.epochs, time_budget=args.time_budget, hpo_epochs=args.hpo_epochs, trials=args.trials,
        hpo_jobs=args.hpo_jobs, train_stages=args.train_stages, image_size=args.image_size, backbone=args.backbone,
        seed=args.seed, gpus=args.gpus, augment_copies=args.augment_copies, rare_factor=args.rare_factor,
        noise_std=args.noise_std, max_size=args.max_size, annotate_max=args.annotate_max,
        video_stride=args.video_stride, score_threshold=args.score_threshold, label_map=args.label_map,
        retries=args.retries, mode=args.mode, transfer_threads=args.transfer_threads,
        setting_sources=setting_sources, folds=args.folds, fold_ensemble=args.fold_ensemble)
    check_data_flags(args, settings.label)
    if not args.no_pretrained:
        from ..detection.weights import job_weights

        settings.backbone, settings.weights_file, note = job_weights(args.backbone)
        if note:
            log.warning("workflow: %s", note)
    return settings
