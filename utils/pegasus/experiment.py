"""Experiment files: every workflow.py setting of one experiment in one YAML file.

    .venv/bin/python workflow.py --config experiments/face_mask_512.yml [flags that override it]

An experiment file is a mapping of workflow.py's flags named with underscores: ``hpo_jobs: 2``,
``image_size: 512``, ``fractions: [0.7, 0.1, 0.2]``, ``local: true``, ``train_stages: [{epochs: 3,
lr: 0.02, trainable_layers: 0}, {epochs: 10, lr: 0.005}]``. What wins: a flag given on the command
line, then the file, then the default (utils/defaults.py and its WORKFLOW_OVERRIDES).
**Relative paths in a file are relative to the file's own folder**, so an experiment names the same
data and run folder from any working directory.

Every key is checked against its flag before anything runs (the flag's type, its choices, its
number of values; true/false for a switch; null only where the default is null), and so are the
label map and the training stages; a problem is one line naming the file and the key, and
workflow.py exits 2.

The run's effective settings are written to RUN_DIR/config.yml (a commented header gives the
command line, the experiment file and its sha256; ``--config RUN_DIR/config.yml`` repeats the
run) and, less the settings that only say how the run is launched, to RUN_DIR/experiment_config.yml,
which every job receives as an input and copies into its run record (utils.provenance).

experiments/default.yml lists every setting with its default and its help; it is generated:

    .venv/bin/python workflow.py --write-default-config experiments/default.yml
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .. import safe_yaml
from ..atomic import write_text
from ..classes import LabelMap, LabelMapError
from ..cli import path_arg
from ..errors import shown
from ..detection.stages import StagesError, parse_stages
from ..provenance import file_sha256
from .config import ConfigError, did_you_mean

CONFIG_FILE = "config.yml"  # RUN_DIR/config.yml: every effective setting, with the command line in its header
# Flags that are not settings of an experiment: they act on the command itself.
NOT_SETTINGS = frozenset({"help", "config", "write_default_config"})
# Settings that say how the run is launched, not what it computes: kept out of the jobs' copy, so that
# resuming a run with another --jobs, or --local after --generate-only, reuses the finished jobs.
LAUNCH_SETTINGS = ("local", "submit", "generate_only", "jobs", "verbose")
STAGES_SETTING = "train_stages"
LABEL_MAP_SETTING = "label_map"
_UNSET = object()  # marks, in a first parse, the settings the command line did not give


@dataclass(frozen=True)
class ExperimentSource:
    """Where a run's settings came from: the command line and, with --config, the experiment file."""

    argv: tuple[str, ...]
    path: Path | None = None          # the experiment file as given on the command line
    sha256: str | None = None
    from_file: frozenset = field(default_factory=frozenset)  # settings the file gave and no flag overrode
    settings: tuple[str, ...] = ()    # every setting's name, in the parser's order (config.yml's order)

    def setting_sources(self) -> dict[str, str]:
        """Setting -> the file that gave it (what WorkflowConfig's errors name instead of the flag)."""
        return {name: str(self.path) for name in self.from_file}


def setting_actions(parser: ExperimentArgumentParser) -> dict[str, argparse.Action]:
    """Every setting of *parser* (its dest) and the action that parses it, in the parser's order."""
    return {dest: action for dest, action in parser.flags.items() if dest not in NOT_SETTINGS}


# -- reading an experiment file ------------------------------------------------------------------------------

class _DuplicateKey(Exception):
    def __init__(self, key, first_line: int, second_line: int):
        super().__init__(key)
        self.key, self.first_line, self.second_line = key, first_line, second_line


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys without a word; an experiment file must not."""

    def construct_mapping(self, node, deep=False):
        self.flatten_mapping(node)
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise _DuplicateKey(key, seen[key], key_node.start_mark.line + 1)
                seen[key] = key_node.start_mark.line + 1
            except TypeError:  # an unhashable key (a list): the base class reports it
                break
        return super().construct_mapping(node, deep=deep)


def _one_line(text) -> str:
    return " ".join(str(text).split())


def read_experiment_file(path: Path) -> dict:
    """The top-level mapping of an experiment file (empty for an empty file); ConfigError naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: experiment file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = _one_line(getattr(error, 'strerror', None) or error)
        raise ConfigError(f"{path}: cannot read the experiment file ({reason})") from None
    try:
        data = safe_yaml.load(text, Loader=_UniqueKeyLoader)  # aliases bounded: an alias bomb is refused
    except _DuplicateKey as duplicate:
        raise ConfigError(f"{path}: {duplicate.key}: given twice (lines {duplicate.first_line} and "
                          f"{duplicate.second_line})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({_one_line(error)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings (key: value) at the top level, "
                          f"got {type(data).__name__}")
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(f"{path}: {shown(key)}: a setting's name must be text (the flag with underscores)")
    return data


def _is_switch(action: argparse.Action) -> bool:
    """store_true / store_false: no value on the command line, true/false in a file."""
    return action.nargs == 0 and isinstance(action.const, bool)


def _scalar(action: argparse.Action, value, where: str, base_dir: Path):
    """One value of *action*'s type from YAML; ConfigError naming *where* when it is of the wrong kind."""
    kind = action.type
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {shown(value)} is not an integer")
        return value
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: {shown(value)} is not a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as text
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: {shown(value)} is not a number")
    if kind in (Path, path_arg):
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{where}: {shown(value)} is not a path")
        path = Path(value).expanduser()
        return path if path.is_absolute() else base_dir / path
    if kind is None:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {shown(value)} is not text")
        return value
    try:  # any other type function: as argparse would call it on the text
        return kind(value if isinstance(value, str) else str(value))
    except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
        raise ConfigError(f"{where}: {shown(value)}: {_one_line(error)}") from None


def _label_map_text(value, where: str) -> str:
    """label_map as the flag's text; a file may also write it as a mapping {source: class}."""
    if isinstance(value, dict):
        value = ",".join(f"{source}={target}" for source, target in value.items())
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {shown(value)} is neither SOURCE=CLASS,... text nor a mapping of source: class")
    try:
        LabelMap.parse(value, flag=where)
    except LabelMapError as error:
        raise ConfigError(str(error)) from None
    return value


def _stages(value, where: str, base_dir: Path) -> list[dict]:
    """train_stages as the list of stage mappings parse_stages accepts (a file's path read relative to it)."""
    if isinstance(value, str) and not value.lstrip().startswith(("[", "{")):
        path = Path(value).expanduser()
        value = path if path.is_absolute() else base_dir / path
    try:
        return [stage.to_dict() for stage in parse_stages(value, where)]
    except StagesError as error:
        raise ConfigError(str(error)) from None


def convert_setting(action: argparse.Action, value, where: str, base_dir: Path):
    """The value of one experiment-file key as the flag would have given it, checked."""
    if value is None:
        if action.default is None:
            return None
        raise ConfigError(f"{where}: null is not allowed here (the default is {plain_value(action.default)!r})")
    if action.dest == STAGES_SETTING:
        return _stages(value, where, base_dir)
    if action.dest == LABEL_MAP_SETTING:
        return _label_map_text(value, where)
    if _is_switch(action):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {shown(value)} is not true or false")
        return value
    if isinstance(action.nargs, int) or action.nargs in ("+", "*"):
        count = action.nargs
        if not isinstance(value, list) or (isinstance(count, int) and len(value) != count) or (
                count == "+" and not value):
            wanted = f"a list of {count} values" if isinstance(count, int) else "a list of values"
            raise ConfigError(f"{where}: expected {wanted}, got {shown(value)}")
        converted = [_scalar(action, item, where, base_dir) for item in value]
    else:
        converted = _scalar(action, value, where, base_dir)
    if action.choices is not None:
        for item in converted if isinstance(converted, list) else [converted]:
            if item not in action.choices:
                raise ConfigError(f"{where}: {shown(item)} is not one of {', '.join(map(str, action.choices))}")
    return converted


def load_settings(parser: ExperimentArgumentParser, path: Path) -> dict:
    """The settings an experiment file gives (setting -> value as the flag would give it), all checked."""
    data = read_experiment_file(path)
    actions = setting_actions(parser)
    base_dir = Path(path).expanduser().absolute().parent
    settings = {}
    for key, value in data.items():
        where = f"{path}: {key}"
        if key in NOT_SETTINGS:
            raise ConfigError(f"{where}: not a setting an experiment file can hold (it is a command-line flag only)")
        action = actions.get(key)
        if action is None:
            raise ConfigError(f"{where}: unknown setting{did_you_mean(key, actions, 'see experiments/default.yml')}")
        settings[key] = convert_setting(action, value, where, base_dir)
    for members in parser.exclusive:
        chosen = [name for name in members if settings.get(name)]
        if len(chosen) > 1:
            raise ConfigError(f"{path}: {chosen[1]}: cannot be true together with {chosen[0]} (choose one of "
                              f"{', '.join(members)})")
    return settings


class SettingGroup:
    """A titled group of flags in --help and in experiments/default.yml, recorded by the parser as they are
    added (so that experiment files read the parser's own record, not argparse's private lists)."""

    def __init__(self, parser: ExperimentArgumentParser, title: str, container, members: list[str] | None = None):
        self.parser, self.title, self.container, self.members = parser, title, container, members

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        action = self.container.add_argument(*args, **kwargs)
        self.parser.flags[action.dest] = action
        self.parser.groups[self.title].append(action.dest)
        if self.members is not None:
            self.members.append(action.dest)
        return action

    def add_mutually_exclusive_group(self) -> SettingGroup:
        """Switches of which an experiment file or the command line may turn on one (--local, --submit, ...)."""
        members: list[str] = []
        self.parser.exclusive.append(members)
        return SettingGroup(self.parser, self.title, self.container.add_mutually_exclusive_group(), members)


class ExperimentArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose --config FILE supplies the defaults of every other flag.

    parse_args() parses the command line twice: first to learn --config and which flags were given
    (every setting starts as a marker, so a flag given with its default value still counts as given),
    then for real, with the file's settings in place of the defaults. The result carries
    ``experiment`` (ExperimentSource): the command line, the file, its sha256 and the settings it gave.

    Add settings through add_setting_group(title).add_argument(...): the parser records every flag
    (``flags``), the groups (``groups``: title -> settings) and the exclusive switches (``exclusive``).
    """

    def __init__(self, *args, **kwargs):
        self.flags: dict[str, argparse.Action] = {}  # dest -> action of every flag but --help, in order
        self.groups: dict[str, list[str]] = {}       # title -> the settings of that group, in order
        self.exclusive: list[list[str]] = []         # the settings of each mutually exclusive group
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        if action.dest != "help":
            self.flags[action.dest] = action
        return action

    def add_setting_group(self, title: str) -> SettingGroup:
        self.groups[title] = []
        return SettingGroup(self, title, self.add_argument_group(title))

    def parse_known_args(self, args=None, namespace=None):
        if namespace is not None:  # a caller's own namespace: plain argparse
            return super().parse_known_args(args, namespace)
        argv = tuple(sys.argv[1:] if args is None else (str(arg) for arg in args))
        probe, _ = super().parse_known_args(list(argv), argparse.Namespace(
            **{dest: _UNSET for dest in self.flags}))
        given = {dest for dest, value in vars(probe).items() if value is not _UNSET}
        config = probe.config if "config" in given else None
        if config is None:
            parsed, extras = super().parse_known_args(list(argv))
            parsed.experiment = ExperimentSource(argv=argv, settings=tuple(setting_actions(self)))
            return parsed, extras
        try:
            from_file = load_settings(self, config)
        except ConfigError as error:
            self.exit(2, f"{self.prog}: {error}\n")
        # A flag on the command line wins; one of a mutually exclusive group (--local, --submit,
        # --generate-only) also replaces the file's choice among them.
        overridden = set(given)
        for members in self.exclusive:
            if given.intersection(members):
                overridden.update(members)
        kept = {name: value for name, value in from_file.items() if name not in overridden}
        parsed, extras = super().parse_known_args(list(argv), argparse.Namespace(**kept))
        parsed.experiment = ExperimentSource(argv=argv, path=Path(config), sha256=file_sha256(config),
                                             from_file=frozenset(kept), settings=tuple(setting_actions(self)))
        return parsed, extras


# -- the effective configuration ----------------------------------------------------------------------------

def plain_value(value, relative_to: Path | None = None):
    """*value* as YAML writes it plainly: paths as text (absolute, or relative to *relative_to* when given),
    tuples as lists."""
    if isinstance(value, Path):
        if relative_to is not None:
            return os.path.relpath(value.expanduser().resolve(), relative_to.resolve())
        return str(value.expanduser().resolve())
    if isinstance(value, (list, tuple)):
        return [plain_value(item, relative_to) for item in value]
    return value


def effective_settings(args, resolved: dict) -> dict:
    """Every setting of the run, in the parser's order (args.experiment.settings): the parsed flags, with
    *resolved* (values the generator settled: the execution site sites.yml chose for an unset flag, the
    stages as mappings) in their place."""
    return {name: plain_value(resolved[name] if name in resolved else getattr(args, name))
            for name in args.experiment.settings}


def job_settings(settings: dict) -> dict:
    """The settings every job receives: all but those that only say how the run is launched."""
    return {name: value for name, value in settings.items() if name not in LAUNCH_SETTINGS}


def _dump(settings: dict) -> str:
    """One "key: value" line per setting, lists and stages in flow style ([0.7, 0.1, 0.2])."""
    lines = []
    for name, value in settings.items():
        text = yaml.safe_dump(value, default_flow_style=True, width=100_000, allow_unicode=True, sort_keys=False)
        text = text.removesuffix("\n").removesuffix("\n...").strip()  # a scalar document ends with "..."
        lines.append(f"{name}: {text}\n")
    return "".join(lines)


def write_effective_config(path: Path, settings: dict, source: ExperimentSource | None) -> Path:
    """Write RUN_DIR/config.yml atomically: every setting, under a header with the command line and the
    experiment file (and its sha256)."""
    path = Path(path)
    source = source or ExperimentSource(argv=tuple(sys.argv[1:]))
    if source.path is not None:
        file_line = f"# experiment file: {Path(source.path).resolve()} (sha256 {source.sha256})"
    else:
        file_line = "# experiment file: none (flags and defaults only)"
    header = "\n".join([
        "# The effective settings of this run: the flags given, then the experiment file, then the defaults.",
        f"# command line: {shlex.join(['workflow.py', *source.argv])}",
        file_line,
        f"# Repeat (or resume) the run: .venv/bin/python workflow.py --config {path}",
    ])
    return write_text(path, f"{header}\n{_dump(settings)}")


def write_job_settings(path: Path, settings: dict) -> Path:
    """Write the jobs' copy of the settings (RUN_DIR/experiment_config.yml) atomically."""
    return write_text(path, "# The settings of this run that shape its results (config.yml less how it is launched);\n"
                            "# every job receives this file and copies it into its run record (experiment_config).\n"
                            + _dump(settings))


# -- experiments/default.yml ---------------------------------------------------------------------------------

DEFAULT_CONFIG_HEADER = """\
# Every setting of workflow.py with its default. An experiment file (experiments/NAME.yml) holds the ones it
# changes; run it with
#   .venv/bin/python workflow.py --config experiments/NAME.yml [flags, which override the file]
# Keys are the flags with underscores (--image-size -> image_size); switches take true/false; null keeps the
# behaviour the comment gives as the default; relative paths are relative to the experiment file's folder.
# Generated from workflow.py's flags and utils/defaults.py (tests/test_experiment_config.py checks it is current):
#   .venv/bin/python workflow.py --write-default-config experiments/default.yml
"""


def _comment(text: str, width: int = 110) -> list[str]:
    return textwrap.wrap(_one_line(text), width=width, initial_indent="# ", subsequent_indent="# ") or ["#"]


def _help_text(parser: ExperimentArgumentParser, action: argparse.Action) -> str:
    text = action.help or ""
    if "%(" in text:
        text = text % {**vars(action), "prog": parser.prog}
    if action.choices is not None:
        text += f" (one of: {', '.join(map(str, action.choices))})"
    return text


def default_config_text(parser: ExperimentArgumentParser, folder: Path) -> str:
    """experiments/default.yml for a file in *folder*: every setting, grouped as in --help, each with its
    help as a comment and its default (paths relative to *folder*)."""
    lines = [DEFAULT_CONFIG_HEADER.rstrip("\n")]
    for title, names in parser.groups.items():
        actions = [parser.flags[name] for name in names if name not in NOT_SETTINGS]
        if not actions:
            continue
        lines += ["", *_comment(f"-- {title} --")]
        for action in actions:
            lines += _comment(_help_text(parser, action))
            lines.append(_dump({action.dest: plain_value(action.default, relative_to=folder)}).rstrip("\n"))
    return "\n".join(lines) + "\n"


def write_default_config(parser: ExperimentArgumentParser, path: Path) -> Path:
    path = Path(path)
    try:
        return write_text(path, default_config_text(parser, path.expanduser().absolute().parent))
    except OSError as error:  # a folder, a missing parent folder, no permission
        raise ConfigError(f"{path}: cannot write the default settings ({error.strerror or error})") from None
