"""A run folder read into one structure: what the report page and the comparison of runs show.

A run folder is what `workflow.py --local` leaves (RUN_DIR with outputs/, statistics.json,
split.csv, config.yml) or the flat folder of the workflow's report job, where every input is
staged side by side. Missing pieces are recorded in ``missing`` (the page and the table say
so); files that are there but cannot be read go to ``problems``, one line each naming the file.
"""

from __future__ import annotations

import csv
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .. import defaults as D
from .. import safe_yaml
from ..data.images import ImageError
from ..errors import InputError, read_json
from ..naming import annotated_stem, output_names, report_name, video_output_names
from .values import hashable, mapping, text


def _made_by(kind: str, role: str) -> str:
    """The file name of job *kind*'s output *role* (utils/naming.py: the names the jobs write)."""
    return output_names(kind)[role]


# The figures the jobs write, in the order the page shows them, with the job that writes each.
FIGURES = {_made_by(kind, role): (title, kind) for kind, role, title in (
    ("plot_class_distribution", "plot", "Objects per class and split"),
    ("hpo_merge", "history_plot", "HPO: objective per trial"),
    ("hpo_merge", "importance_plot", "HPO: parameter importances"),
    ("train", "loss_plot", "Training and validation loss"),
    ("evaluate", "confusion_matrix.png", "Detection confusion matrix"),
    ("evaluate", "pr_curves.png", "Precision-recall curves (IoU 0.5)"),
    ("merge_predictions", "histogram", "Per-image compliance of the prediction set"),
    ("merge_predictions", "folder_plot", "Compliance per folder of the prediction set, with 95 % intervals"),
)}
# The data files the report reads, with the job that writes each (missing ones are named on the page).
DATA_FILES = {_made_by(kind, role): kind for kind, role in (
    ("evaluate", "evaluation.json"),
    ("evaluate", "evaluation_images.json"),
    ("merge_predictions", "compliance"),
    ("hpo_merge", "params"),
    ("train", "metrics_csv"),
    ("plot_class_distribution", "counts_csv"),
)}
DATA_FILES[report_name("preprocess_test")] = "preprocess"
# A --folds run's cross-validation (aggregate_folds): read where it is there; a run without folds lacks nothing.
KFOLD_SUMMARY = _made_by("aggregate_folds", "summary")
FOLD_FIGURES = {_made_by("aggregate_folds", "plot"): ("Cross-validation: each fold (dots) and mean ± std (bars)",
                                                      "aggregate_folds")}
# predict_video's summary and plot, one of each per video of --pred-videos (video_summary_<tag>.json), or untagged
VIDEO_SUMMARY, VIDEO_PLOT = VIDEO_NAMES = _made_by("predict_video", "summary"), _made_by("predict_video", "plot")
VIDEO_PLOT_TITLE = "Percent with_mask among the faces kept at the threshold over the video's time, and faces per frame"
RUN_RECORD_SUFFIX = "_run.json"
ANNOTATED_PREFIX = "annotated_"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# A run that lacks one of these is unfinished (the comparison says which it lacks).
FINISHED_MARKERS = ("evaluation.json", "compliance.json")


class RunFolderError(InputError):
    """A run folder that cannot be read at all (not a folder, or no run output in it)."""


def video_tag(name: str, untagged: str = VIDEO_SUMMARY) -> str | None:
    """The video tag of a predict_video output named like *untagged* ('' for the untagged name itself), else None."""
    stem, suffix = untagged.rsplit(".", 1)
    if name == untagged:
        return ""
    tagged = name.startswith(f"{stem}_") and name.endswith(f".{suffix}") and len(name) > len(untagged) + 1
    return name[len(stem) + 1:-len(suffix) - 1] if tagged else None


def video_plot_name(summary_name: str) -> str:
    """The plot predict_video writes beside the summary *summary_name*."""
    return video_output_names(video_tag(summary_name) or None)["plot"]


def figure_title(name: str) -> tuple[str, str]:
    """(title, the job that writes it) of a figure the page shows."""
    return (VIDEO_PLOT_TITLE, "predict_video") if video_tag(name, VIDEO_PLOT) is not None else \
        {**FIGURES, **FOLD_FIGURES}[name]


def is_report_input(name: str) -> bool:
    """Whether the report reads an output file of this name: the workflow hands the report job these."""
    return (name in FIGURES or name in DATA_FILES or name in FOLD_FIGURES or name == KFOLD_SUMMARY
            or name.endswith(RUN_RECORD_SUFFIX) or any(video_tag(name, made) is not None for made in VIDEO_NAMES)
            or (name.startswith(ANNOTATED_PREFIX) and name.endswith((".tar", *IMAGE_SUFFIXES))))


@dataclass
class AnnotatedImage:
    """An annotated prediction image: a file of the outputs or a member of an annotated_<shard>.tar."""
    name: str
    source: Path
    member: str | None = None
    # The member's header as the listing read it: where its bytes start, so that a read seeks there instead of
    # scanning the archive's headers again (getmember: each of the grid's 24 images read every header).
    info: tarfile.TarInfo | None = field(default=None, repr=False, compare=False)

    @property
    def stem(self) -> str:
        """The predicted image's stem: the name without "annotated_" and the extension."""
        return Path(self.name).stem.removeprefix(ANNOTATED_PREFIX)

    def read_bytes(self, limit: int | None = None) -> bytes:
        """The image file's bytes; ImageError, before reading, when it holds more than *limit* bytes
        (default defaults.REPORT_FIGURE_MAX_BYTES) or is not a regular file."""
        limit = limit or D.REPORT_FIGURE_MAX_BYTES
        if self.member is None:
            return read_bounded(self.source, limit)
        with tarfile.open(self.source) as archive:
            info = self.info or archive.getmember(self.member)
            if not info.isfile():
                raise ImageError(f"{self.source}:{self.member}", "not a file")
            if info.size > limit:
                raise ImageError(f"{self.source}:{self.member}", too_large(info.size, limit))
            handle = archive.extractfile(info)
            if handle is None:
                raise ImageError(f"{self.source}:{self.member}", "not a file")
            return handle.read()


def too_large(size: int, limit: int) -> str:
    return f"file too large to embed ({size / 2**20:.0f} MB; the limit is {limit / 2**20:.0f} MB)"


def read_bounded(path: Path, limit: int) -> bytes:
    """*path*'s bytes; ImageError, before reading, when it is not a regular file or holds more than *limit*."""
    if not path.is_file():
        raise ImageError(path, "not a regular file")
    size = path.stat().st_size
    if size > limit:
        raise ImageError(path, too_large(size, limit))
    return path.read_bytes()


@dataclass
class RunFolder:
    path: Path
    outputs: Path
    evaluation: dict | None = None
    evaluation_images: dict | None = None
    compliance: dict | None = None
    hpo: dict | None = None
    preprocess_test: dict | None = None
    train_metrics: list[dict] = field(default_factory=list)
    class_distribution: list[dict] = field(default_factory=list)
    figures: dict[str, Path] = field(default_factory=dict)
    run_records: dict[str, dict] = field(default_factory=dict)
    statistics: dict | None = None
    validation: dict | None = None
    kfold: dict | None = None            # kfold_summary.json of a --folds run
    videos: dict[str, dict] = field(default_factory=dict)  # predict_video's summaries by file name
    has_folds: bool = False              # a --folds run: its summary or plot is there
    config: dict | None = None
    config_source: str = ""
    split_counts: dict[str, int] = field(default_factory=dict)
    annotated: list[AnnotatedImage] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def has_config_file(self) -> bool:
        """Whether the settings are the run's own configuration (not rebuilt from the run records' params)."""
        return bool(self.config_source) and self.config_source != REBUILT_CONFIG

    @property
    def unfinished(self) -> list[str]:
        """The outputs of a finished run this one lacks (empty for a finished run)."""
        return [name for name in FINISHED_MARKERS if name in self.missing]

    def packages(self) -> dict[str, str | None]:
        """Package versions from the run records (the first record that has them)."""
        for record in self.run_records.values():
            if isinstance(record.get("packages"), dict):
                return record["packages"]
        return {}

    def package_differences(self) -> dict[str, set]:
        """Packages whose version differs between the run's records (jobs run in different environments)."""
        versions: dict[str, set] = {}
        for record in self.run_records.values():
            for package, version in mapping(record.get("packages")).items():
                versions.setdefault(package, set()).add(hashable(version))
        return {package: found for package, found in versions.items() if len(found) > 1}


def _regular_file(path: Path, run: RunFolder, what: str) -> bool:
    """Whether *path* is a regular file to read; a missing one is noted as missing, anything else (a FIFO,
    which would block the read forever, a folder, a device, a file larger than any job writes) as a problem."""
    if not path.exists():
        run.missing.append(path.name)
        return False
    if not path.is_file():
        run.problems.append(f"{path}: {what} is not a regular file; left out")
        return False
    if (size := path.stat().st_size) > D.REPORT_DATA_MAX_BYTES:
        run.problems.append(f"{path}: {what} of {size / 2**20:,.0f} MB, over the {D.REPORT_DATA_MAX_BYTES / 2**20:.0f} "
                            "MB read at most; left out")
        return False
    return True


def _read_json(path: Path, run: RunFolder, what: str) -> dict | None:
    if not _regular_file(path, run, what):
        return None
    try:
        value = read_json(path, what)  # undecodable, too deep, an integer over Python's digit limit: one line
    except InputError as error:
        run.problems.append(str(error))
        return None
    except OSError as error:
        run.problems.append(f"{path}: {what} cannot be read ({error})")
        return None
    if not isinstance(value, dict):
        run.problems.append(f"{path}: {what} is not a JSON object")
        return None
    return value


def _read_csv(path: Path, run: RunFolder, what: str, columns: tuple[str, ...], collect=list):
    """*collect* (default list: every row) of the rows of a CSV file that has the *columns* the page reads, as they
    are read; a file without them, or without a row, is a problem said (its table would show zeros, or say the
    file is not in the run), not a silent empty table; collect(()) then."""
    if not _regular_file(path, run, what):
        return collect(())
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            if lacking := [column for column in columns if column not in header]:
                run.problems.append(f"{path}: {what} lacks column(s) {', '.join(lacking)} (its header: "
                                    f"{','.join(header)[:200] or 'none'}); left out")
                return collect(())
            result = collect(reader)
    except FileNotFoundError:
        run.missing.append(path.name)
        return collect(())
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        run.problems.append(f"{path}: {what} cannot be read ({error})")
        return collect(())
    if not result:
        run.problems.append(f"{path}: {what} holds no rows; left out")
    return result


# The effective configuration: the driver's RUN_DIR/config.yml; the jobs' copy of it (the workflow
# stages it into every job's folder, the report job's too), which each run record also carries.
CONFIG_FILES = ("config.yml", "experiment_config.yml")
RECORD_CONFIG_KEYS = ("experiment_config", "config")


def _read_config(run: RunFolder) -> None:
    """The effective configuration: a CONFIG_FILES file, else one a run record carries, else the
    settings rebuilt from the run records' params."""
    import yaml

    for config_file in (run.path / name for name in CONFIG_FILES):
        if not config_file.is_file() or not _regular_file(config_file, run, "configuration"):
            continue
        try:
            config = safe_yaml.load(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            run.problems.append(f"{config_file}: configuration cannot be read ({' '.join(str(error).split())})")
            continue
        if isinstance(config, dict):
            run.config, run.config_source = config, config_file.name
            return
        run.problems.append(f"{config_file}: configuration is not a mapping of settings")
    for name, record in sorted(run.run_records.items()):
        for key in RECORD_CONFIG_KEYS:
            if isinstance(record.get(key), dict):
                run.config, run.config_source = record[key], f"{name}{RUN_RECORD_SUFFIX}"
                return
    if run.run_records:
        run.config = settings_from_run_records(run.run_records)
        run.config_source = REBUILT_CONFIG


REBUILT_CONFIG = "run records' params"
# What a job's run record params hold besides its settings: results and files (not settings to compare).
RECORD_RESULTS = {"summary", "skipped", "problems", "trial_counts", "best_value", "run_record"}
FILE_SUFFIXES = {".tar", ".json", ".pt", ".pth", ".csv", ".png", ".jpg", ".txt", ".journal", ".yml", ".mp4", ".xml"}


def _names_a_file(value) -> bool:
    return isinstance(value, str) and (value == "." or "/" in value or Path(value).suffix.lower() in FILE_SUFFIXES)


def settings_from_run_records(records: dict[str, dict]) -> dict[str, dict]:
    """A configuration rebuilt from the run records, for runs without config.yml: per job kind, the
    params every job of that kind ran with (train's resolved values over its flags), without the
    files a job read or wrote and without the results some records carry."""
    by_kind: dict[str, list[dict]] = {}
    for name, record in sorted(records.items()):
        if record.get("job") == "report":  # where a page of the run went: not how the run was made
            continue
        params = dict(mapping(record.get("params")))
        if isinstance(params.get("resolved"), dict):
            params.update(params.pop("resolved"))
        flat = {key: value for key, value in flatten(params).items()
                if key.split(".")[0] not in RECORD_RESULTS and not _names_a_file(value)}
        by_kind.setdefault(str(record.get("job") or name), []).append(flat)
    config = {}
    for kind, flats in by_kind.items():
        shared = {key: value for key, value in flats[0].items()
                  if all(key in other and other[key] == value for other in flats[1:])}
        config[kind] = shared
    return config


def _split_counts(path: Path, run: RunFolder) -> dict[str, int]:
    def count(rows) -> dict[str, int]:  # as the rows are read: a list of a split.csv of 1M images held 368 MB
        return dict(Counter(row.get("split") or "?" for row in rows))

    return _read_csv(path, run, "split table", ("split",), count)


def _annotated_images(outputs: Path, run: RunFolder) -> list[AnnotatedImage]:
    images = [AnnotatedImage(path.name, path) for path in sorted(outputs.glob(f"{ANNOTATED_PREFIX}*"))
              if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()]  # a FIFO would block the read
    for archive in sorted(outputs.glob(f"{ANNOTATED_PREFIX}*.tar")):
        if not archive.is_file():
            run.problems.append(f"{archive}: annotated image archive is not a regular file; left out")
            continue
        try:
            with tarfile.open(archive) as handle:
                members = [m for m in handle.getmembers()
                           if m.isfile() and Path(m.name).suffix.lower() in IMAGE_SUFFIXES]
        except (OSError, tarfile.TarError) as error:
            run.problems.append(f"{archive}: annotated images cannot be read ({error})")
            continue
        images += [AnnotatedImage(Path(member.name).name, archive, member.name, member)
                   for member in sorted(members, key=lambda member: member.name)]
    return images


def read_run_folder(path) -> RunFolder:
    """Read a run folder; RunFolderError when it is not a folder or holds no run output at all."""
    path = Path(path)
    if not path.is_dir():
        raise RunFolderError(f"{path}: run folder not found" if not path.exists() else f"{path}: not a folder")
    outputs = path / "outputs" if (path / "outputs").is_dir() else path
    run = RunFolder(path=path.resolve(), outputs=outputs)
    run.evaluation = _read_json(outputs / "evaluation.json", run, "evaluation")
    run.evaluation_images = _read_json(outputs / "evaluation_images.json", run, "per-image evaluation")
    run.compliance = _read_json(outputs / "compliance.json", run, "compliance summary")
    run.hpo = _read_json(outputs / "best_hpo_params.json", run, "HPO result")
    run.preprocess_test = _read_json(outputs / "preprocess_test_report.json", run, "test set preprocess report")
    run.train_metrics = _read_csv(outputs / "train_metrics.csv", run, "training metrics", ("epoch",))
    run.class_distribution = _read_csv(outputs / "class_distribution.csv", run, "class distribution",
                                       ("split", "class", "objects", "images"))
    for name in FIGURES:
        if (outputs / name).is_file():
            run.figures[name] = outputs / name
        else:
            run.missing.append(name)
    run.figures.update({name: outputs / name for name in FOLD_FIGURES if (outputs / name).is_file()})
    run.has_folds = (outputs / KFOLD_SUMMARY).exists() or any(name in run.figures for name in FOLD_FIGURES)
    if run.has_folds:  # a summary not there is missing then
        run.kfold = _read_json(outputs / KFOLD_SUMMARY, run, "cross-validation summary")
    for summary in sorted(outputs.glob("*.json")):  # every video's summary: the untagged name or a tagged one
        if video_tag(summary.name) is not None and (video := _read_json(summary, run, "video summary")) is not None:
            run.videos[summary.name] = video
            if (outputs / video_plot_name(summary.name)).is_file():
                run.figures[video_plot_name(summary.name)] = outputs / video_plot_name(summary.name)
    for record_file in sorted(outputs.glob(f"*{RUN_RECORD_SUFFIX}")):
        if video_tag(record_file.name) is not None:  # a video's summary whose tag ends in _run: read above
            continue
        record = _read_json(record_file, run, "run record")
        if record is not None:
            run.run_records[record_file.name.removesuffix(RUN_RECORD_SUFFIX)] = record
    run.statistics = _read_json(path / "statistics.json", run, "workflow statistics")
    if (path / "validation_report.json").exists():  # the driver writes it; a report job's folder has none
        run.validation = _read_json(path / "validation_report.json", run, "data validation report")
    split_file = path / "split.csv" if (path / "split.csv").exists() else outputs / "split.csv"
    run.split_counts = _split_counts(split_file, run)
    _read_config(run)
    run.annotated = _annotated_images(outputs, run)
    if not (run.evaluation or run.compliance or run.run_records or run.figures or run.statistics):
        raise RunFolderError(f"{path}: no run outputs found (no evaluation.json, compliance.json, *_run.json, "
                             "figures or statistics.json in it or in its outputs/)")
    return run


def flatten(value, prefix: str = "") -> dict[str, object]:
    """Nested mappings and lists as one level: {"train_stages": [{"lr": 0.1}]} -> {"train_stages.0.lr": 0.1}."""
    if isinstance(value, dict) and value:
        flat = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}{key}."))
        return flat
    if isinstance(value, list) and value:
        flat = {}
        for index, item in enumerate(value):
            flat.update(flatten(item, f"{prefix}{index}."))
        return flat
    return {prefix.removesuffix("."): value}


def prefix_of_test_names(run: RunFolder) -> str:
    """The prefix preprocess put before the test images' names (evaluate sees those names, predict the originals)."""
    params = mapping(mapping(mapping(run.preprocess_test).get("run_record")).get("params"))
    return text(params.get("prefix"), "")


def image_errors_by_stem(run: RunFolder) -> dict[str, dict]:
    """evaluation_images.json's entries keyed by the original image stem (the annotated images' names)."""
    prefix = prefix_of_test_names(run)
    entries = mapping(run.evaluation_images).get("images")
    return {Path(entry["image"]).stem.removeprefix(prefix): entry for entry in (entries if isinstance(entries, list)
                                                                                else [])
            if isinstance(entry, dict) and isinstance(entry.get("image"), str)}


def predicted_by_stem(run: RunFolder) -> dict[str, dict]:
    """compliance.json's per-image figures keyed by the stem of their annotated copies (naming.annotated_stem:
    "pred_shard.tar:name.jpg" -> "name", "pred_shard.tar:siteA/name.jpg" -> "siteA__name")."""
    per_image = mapping(mapping(run.compliance).get("per_image"))
    return {annotated_stem(key.rsplit(":", 1)[-1]) if ":" in key else Path(key).stem: value
            for key, value in per_image.items()}
