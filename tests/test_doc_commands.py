"""The command lines users copy from README.md and docs/*.md, and every flag's --help, agree with the parsers.

Each `bin/NAME.py`, `workflow.py` and `python -m utils.executor` in a code block or a `code span` is read with the
flags that follow it: every flag must be one of that parser's own (argparse would also take an abbreviation, a
reader would not find it in --help), and a whole command in a code block must parse. `bench/NAME.py` flags are
checked against the script's add_argument calls, `make TARGET VAR=...` against the Makefile, and the example
commands in each --help against their parsers. Then each parser's --help: a default the help states as a number
or a word equals the real one, each default is stated once, and every flag with a default says it. Nothing runs;
the parsers are built once.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest

from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# bin/ may follow a folder (/work/main/bin/preprocess.py); workflow.py may not (bench/workflow.py has its own flags).
COMMAND = re.compile(r"(?<!\w)bin/(?P<script>\w+)\.py|(?<![\w/])(?P<workflow>workflow)\.py"
                     r"|python -m (?P<executor>utils\.executor)")
BENCH = re.compile(r"(?<![\w/])bench/(?P<bench>\w+)\.py")
FLAG = re.compile(r"(?<![\w-])--[a-z][\w-]*")
MAKE = re.compile(r"\bmake ([a-z][\w-]*)((?: [A-Z_]+=\S*)*)")


def code_lines(path: Path) -> list[tuple[int, str, bool]]:
    """(line number, text, whole command?) of every line of a ``` block (continuations joined) and every
    `code span` in *path*."""
    text = path.read_text(encoding="utf-8")
    found = []
    for block in re.finditer(r"^```\w*\n(.*?)^```", text, re.S | re.M):
        first = text.count("\n", 0, block.start(1)) + 1
        for offset, line in enumerate(block.group(1).replace("\\\n", " ").splitlines()):
            found.append((first + offset, re.split(r"\s#\s", line)[0], True))
    outside = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S | re.M)
    for span in re.finditer(r"`([^`]+)`", outside):  # a span may go on to the next line
        found.append((outside.count("\n", 0, span.start()) + 1, " ".join(span.group(1).split()), False))
    return found


def commands(lines: list[tuple[int, str, bool]]) -> list[tuple[int, str, list[str], bool]]:
    """(line, parser name, the words after it, whole command?) for each command in *lines* (code_lines)."""
    found = []
    for number, line, whole in lines:
        starts = list(COMMAND.finditer(line))
        for index, start in enumerate(starts):
            end = starts[index + 1].start() if index + 1 < len(starts) else len(line)
            # up to the next shell command or a redirection (in a span `a | b` is more often a choice of values than a
            # pipe; `<folder>` is a placeholder, not an input)
            rest = re.split((r"\s\|(?=\s)|" if whole else "") + r"\s(?:&&|;|&)(?=\s|$)|\s\d*>|\s<(?![\w-]+>)",
                            line[start.end():end])[0]
            rest = re.sub(r"[\[\]]|\.\.\.|…", " ", rest)  # [optional flags ...]
            try:
                words = shlex.split(rest)
            except ValueError:  # prose with a lone quote
                words = rest.split()
            name = start.group("script") or start.group("workflow") or "executor"
            found.append((number, name, words, whole))
    return found


def load_parser(name: str) -> argparse.ArgumentParser:
    if name == "executor":
        from utils.executor.scheduler import get_args_parser
        return get_args_parser()
    if name == "workflow":
        spec = importlib.util.spec_from_file_location("workflow_for_docs", ROOT / "workflow.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_args_parser()
    return load_script(ROOT, name).get_args_parser()


@pytest.fixture(scope="module")
def parsers() -> dict[str, argparse.ArgumentParser]:
    names = ["workflow", "executor", *sorted(path.stem for path in (ROOT / "bin").glob("*.py"))]
    return {name: load_parser(name) for name in names}


def own_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def bench_flags(name: str) -> set[str]:
    tree = ast.parse((ROOT / "bench" / f"{name}.py").read_text(encoding="utf-8"))
    return {arg.value for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument"
            for arg in node.args if isinstance(arg, ast.Constant) and str(arg.value).startswith("--")}


def parse_problem(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """argparse's error for *argv*, or None when it parses."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(argv)
        except SystemExit as stop:
            if stop.code:
                return err.getvalue().strip().splitlines()[-1]
    return None


def test_the_docs_show_commands(parsers):
    """The reader below finds what it checks (a change of the docs' form would otherwise pass unchecked)."""
    shown = [name for path in DOCS for _, name, _, whole in commands(code_lines(path)) if whole]
    assert {"workflow", "serve", "report", "compare_runs", "make_shards"} <= set(shown)


@pytest.mark.parametrize("path", DOCS, ids=lambda path: path.name)
def test_every_flag_a_doc_gives_a_script_is_one_of_its_own(parsers, path):
    wrong = [f"{path.name}:{number}: {name} has no {flag}"
             for number, name, words, _ in commands(code_lines(path))
             for flag in (word.split("=", 1)[0] for word in words if FLAG.fullmatch(word.split("=", 1)[0]))
             if flag not in own_flags(parsers[name])]
    for number, line, _ in code_lines(path):
        starts = list(BENCH.finditer(line))
        for index, start in enumerate(starts):
            rest = line[start.end():starts[index + 1].start() if index + 1 < len(starts) else len(line)]
            wrong += [f"{path.name}:{number}: bench/{start['bench']}.py has no {flag}"
                      for flag in FLAG.findall(rest) if flag not in bench_flags(start["bench"])]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("path", DOCS, ids=lambda path: path.name)
def test_every_whole_command_in_a_code_block_parses(parsers, path):
    wrong = [f"{path.name}:{number}: {name} {shlex.join(words)}: {problem}"
             for number, name, words, whole in commands(code_lines(path)) if whole
             for problem in [parse_problem(parsers[name], words)] if problem]
    assert not wrong, "\n".join(wrong)


def test_every_flag_in_a_help_example_is_the_scripts_own(parsers):
    """The example command lines of each --help (its description's indented lines), e.g. bin/compare_runs.py's."""
    wrong, examples = [], 0
    for shown_by, parser in parsers.items():
        lines = [(number, line, False) for number, line in enumerate((parser.description or "").splitlines(), 1)
                 if line.startswith("    ")]
        for number, name, words, _ in commands(lines):
            examples += 1
            wrong += [f"{shown_by} --help, line {number}: {name} has no {flag}"
                      for flag in (word.split("=", 1)[0] for word in words) if FLAG.fullmatch(flag)
                      and flag not in own_flags(parsers[name])]
    assert examples >= 10 and not wrong, "\n".join(wrong) or f"only {examples} examples found"


@pytest.mark.parametrize("path", DOCS, ids=lambda path: path.name)
def test_every_make_target_and_variable_a_doc_names_is_in_the_makefile(path):
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.M))
    variables = set(re.findall(r"^([A-Z_]+)\s*\??=", makefile, re.M))
    wrong = []
    for number, line, _ in code_lines(path):
        for target, assignments in MAKE.findall(line):
            wrong += [f"{path.name}:{number}: make {target}: no such target"] if target not in targets else []
            wrong += [f"{path.name}:{number}: make {target}: no variable {name}"
                      for name in re.findall(r"([A-Z_]+)=", assignments) if name not in variables]
    assert not wrong, "\n".join(wrong)


def stated_default(help_text: str) -> str | None:
    """What '(default: X)' says, up to its first ';' or ',' or ' (' (the explanation after it)."""
    match = re.search(r"\(default: ((?:\d,(?=\d)|[^;,)])*?)(?: \(|[;,)])", " ".join(help_text.split()))
    return match.group(1).strip() if match else None


def written_forms(value) -> set[str]:
    """The ways --help writes *value*: 20.0 as 20.0 or 20, 25000000 as 25,000,000, (0.7, 0.1, 0.2) as 0.7 0.1 0.2."""
    if isinstance(value, (list, tuple)):
        return {" ".join(str(item) for item in value)}
    if isinstance(value, bool):
        return {str(value)}
    if isinstance(value, (int, float)):
        return {str(value), f"{value:g}", f"{value:,}"}
    return {str(value)}


def rendered_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each flag's help as --help prints it (the formatter's own additions included), whitespace joined."""
    text = parser.format_help()
    return {chunk.split()[0].rstrip(","): " ".join(chunk.split())
            for chunk in re.split(r"\n(?=  -)", text)[1:] if chunk.strip().startswith("-")}


def test_every_stated_default_is_the_real_one(parsers):
    wrong = []
    for name, parser in parsers.items():
        helps = rendered_help(parser)
        for action in parser._actions:
            if not action.option_strings:
                continue
            shown = helps.get(action.option_strings[0], "")
            if shown.count("(default:") > 1 or "(default: )" in shown:
                wrong.append(f"{name} {action.option_strings[0]}: its help gives its default twice or empty: {shown}")
            if action.default in (None, False, "", [], argparse.SUPPRESS):
                continue
            said = stated_default(shown)
            if said is None:
                wrong.append(f"{name} {action.option_strings[0]}: its help does not give its default "
                             f"{action.default!r}")
            elif " " not in said or isinstance(action.default, (int, float, list, tuple)):
                if said not in written_forms(action.default):
                    wrong.append(f"{name} {action.option_strings[0]}: help says {said!r}, the default is "
                                 f"{action.default!r}")
    assert not wrong, "\n".join(wrong)


def test_a_commands_shell_redirections_and_background_are_not_its_words():
    # a doc may show `bin/serve.py --model m.pt > serve.log 2>&1 &`: the parser sees only --model m.pt
    shown = [(1, ".venv/bin/python bin/serve.py --model m.pt > serve.log 2>&1 &", True),
             (2, "bin/report.py runs/a >report.txt 2>errors.txt && echo done", True),
             (3, "bin/predict.py --images I </dev/null & bin/serve.py --port 1", True),
             (4, "bin/train.py --images <folder> | tee log", False)]
    assert [(name, words) for _, name, words, _ in commands(shown)] == [
        ("serve", ["--model", "m.pt"]), ("report", ["runs/a"]), ("predict", ["--images", "I"]),
        ("serve", ["--port", "1"]), ("train", ["--images", "<folder>", "|", "tee", "log"])]
