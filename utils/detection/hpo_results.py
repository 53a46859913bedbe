"""Merging the HPO workers (bin/hpo_merge.py): each worker's best_<i>.json read and checked field by field,
the workers checked to be one search, their journals read, and the best trial over all of them.

A result file is input: its search space is read as a syntax tree (parse_distribution), never evaluated,
and a value of the wrong kind is one line naming the file and the field (HpoError).
HpoError, FINISHED and trial_records, which the search (hpo.py) writes its results with, live here too, so that
the merge job never imports the search and with it torch (5 s of a merge's start).
"""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from ..errors import InputError, is_finite_number, read_json, shown

# This module, and bin/hpo_merge.py with it, imports no torch: utils/detection/hpo.py (the search) imports the
# training, and a merge of JSON files waited seconds for torch and torchvision that it never used.

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class HpoError(InputError):
    """Bad HPO input: no data, a worker index out of range, an undefined objective, a result file that is not one."""


def trial_records(study: optuna.Study) -> list[dict]:
    return [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
             "intermediate_values": {str(k): v for k, v in t.intermediate_values.items()},
             "user_attrs": t.user_attrs} for t in study.get_trials(deepcopy=False)]


DISTRIBUTIONS = {"FloatDistribution": FloatDistribution, "IntDistribution": IntDistribution,
                 "CategoricalDistribution": CategoricalDistribution}


def parse_distribution(text, where: str = "search space") -> object:
    """Back from SearchSpace.describe()'s repr strings ("FloatDistribution(high=0.1, log=True, low=0.0001,
    step=None)") to Optuna distributions. Read as a syntax tree, never evaluated: a result file is input, and
    an eval() with no builtins still runs code reached through attributes. HpoError naming *where* when the
    text is not one such call with literal keyword values."""
    import ast

    problem = None
    try:
        call = ast.parse(str(text), mode="eval").body
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in DISTRIBUTIONS
                and not call.args and all(keyword.arg for keyword in call.keywords)):
            problem = "not an Optuna distribution"
        else:
            values = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
            return DISTRIBUTIONS[call.func.id](**values)
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError) as error:
        problem = " ".join(str(error).split()) or type(error).__name__
    raise HpoError(f"{where}: {shown(text)} is not a search-space distribution ({problem})")


def read_worker_results(paths) -> list[dict]:
    results = []
    for path in paths:
        path = Path(path)
        data = read_json(path, "HPO result", HpoError)
        if not isinstance(data, dict) or "best_params" not in data:
            raise HpoError(f"{path}: not an HPO result (no best_params)")
        check_worker_result(data, path)
        data["_file"] = str(path)
        results.append(data)
    _check_workers_agree(results)
    return results


def check_worker_result(data: dict, path) -> None:
    """A worker's best_<i>.json as bin/hpo.py writes it, field by field (HpoError naming the file and field): the
    merge, its plots and the train job that reads the best parameters must not meet a value of another kind."""
    def bad(field: str, value, what: str):
        raise HpoError(f"{path}: {field}: {shown(value)} is not {what}")

    if data.get("worker_index") is not None and not (isinstance(data["worker_index"], int)
                                                     and not isinstance(data["worker_index"], bool)
                                                     and data["worker_index"] >= 0):
        bad("worker_index", data["worker_index"], "a worker number")
    if data.get("best_value") is not None and not is_finite_number(data["best_value"]):
        bad("best_value", data["best_value"], "a finite number")
    params = data.get("best_params")
    if data.get("best_value") is not None or params is not None:
        if not isinstance(params, dict):
            bad("best_params", params, "a mapping of parameter -> value")
        for name, value in params.items():
            if not (is_finite_number(value) or isinstance(value, str)):
                bad(f"best_params.{name}", value, "a number or a name")
    if data.get("study_name") is not None and not isinstance(data["study_name"], str):
        bad("study_name", data["study_name"], "a study name")
    for key in ("fixed_params", "trial_counts"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            bad(key, data[key], "a mapping")
    for key in ("full_search_space", "search_space"):  # read here, so that a bad one names its file
        space = data.get(key)
        if space is not None and not isinstance(space, dict):
            bad(key, space, "a mapping of parameter -> distribution")
        for name, text in (space or {}).items():
            parse_distribution(text, f"{path}: {key}.{name}")
    trials = data.get("trials", [])
    if not isinstance(trials, list):
        bad("trials", trials, "a list of trials")
    for index, trial in enumerate(trials):
        where = f"trials[{index}]"
        if not isinstance(trial, dict):
            bad(where, trial, "a trial record")
        if not isinstance(trial.get("number"), int) or trial.get("state") not in TrialState.__members__:
            bad(where, {key: trial.get(key) for key in ("number", "state")}, "a trial number and state")
        if trial.get("value") is not None and not is_finite_number(trial["value"]):
            bad(f"{where}.value", trial["value"], "a finite number")
        if not isinstance(trial.get("params", {}), dict) or not all(
                is_finite_number(v) or isinstance(v, str) for v in trial.get("params", {}).values()):
            bad(f"{where}.params", trial.get("params"), "a mapping of parameter -> value")
        steps = trial.get("intermediate_values") or {}
        if not isinstance(steps, dict) or not all(str(k).isdigit() and is_finite_number(v) for k, v in steps.items()):
            bad(f"{where}.intermediate_values", steps, "a mapping of epoch -> finite value")


def _check_workers_agree(results: list[dict]) -> None:
    """One search split over workers: each worker once, and every worker trained alike (what train will use)."""
    seen: dict = {}
    for result in results:
        index = result.get("worker_index")
        if index is not None and index in seen:
            raise HpoError(f"{result['_file']}: worker_index {index} is also {seen[index]}'s")
        seen[index] = result["_file"]
    first = results[0] if results else {}
    for result in results[1:]:
        for key in ("backbone", "image_size", "epochs", "optimizer"):
            ours, theirs = (first.get("fixed_params") or {}).get(key), (result.get("fixed_params") or {}).get(key)
            if ours is not None and theirs is not None and ours != theirs:
                raise HpoError(f"{result['_file']}: trained with {key}={shown(theirs)}, {first['_file']} with "
                               f"{shown(ours)}: not one search")


class JournalOfAnotherWorker(Exception):
    """Raised inside journal_trials' reading, whose ValueErrors mean an unreadable journal; said as an HpoError."""


def worker_journal_trials(journals, results: list[dict]) -> list[list[dict]]:
    """Each worker's trials from its journal (hpo_merge --journals, in the order of --inputs): the journal must hold
    the study its worker's best.json names, so journals given in another order (the plots would put one worker's
    trials under another's line) or from another search are refused, naming both files."""
    return [journal_trials(journal, result.get("study_name"), result.get("_file"))
            for journal, result in zip(journals, results)]


def journal_trials(path, study_name: str | None = None, worker_file=None) -> list[dict]:
    """Trial records of the study *study_name* (of the worker result *worker_file*) in a journal file, or of every
    study in it when no name is given (authoritative when best.json is stale)."""
    import tempfile

    path = Path(path)
    if not path.is_file():
        raise HpoError(f"{path}: journal not found")
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]  # a last line a killed worker left half written is not read
    with tempfile.TemporaryDirectory(prefix="journal.") as tmp:
        readable = path if complete == data else Path(tmp) / path.name
        if readable != path:
            readable.write_bytes(complete)
        try:
            storage = JournalStorage(JournalFileBackend(str(readable)))
            records, names = [], optuna.get_all_study_names(storage)
            if study_name in names:  # its worker's study only: a journal reused by another search holds more
                names = [study_name]
            elif study_name is not None and names:
                raise JournalOfAnotherWorker(f"{path}: holds the study {', '.join(map(shown, names))}, not "
                                             f"{shown(study_name)} of {worker_file}: give one journal per --inputs "
                                             "file, in the same order")
            for name in names:
                records += trial_records(optuna.load_study(study_name=name, storage=storage))
        except JournalOfAnotherWorker as error:
            raise HpoError(str(error)) from None
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AssertionError) as error:
            raise HpoError(f"{path}: not a readable Optuna journal ({type(error).__name__}: "
                           f"{' '.join(str(error).split())[:200]})") from None
    if not names:  # Optuna reads a file of lines that are not its records as an empty journal
        raise HpoError(f"{path}: holds no Optuna study (not a journal of bin/hpo.py)")
    return records


def merge_results(results: list[dict]) -> dict:
    """The best of the workers' best trials (highest objective value)."""
    usable = [r for r in results if r.get("best_value") is not None]
    objectives = {r.get("objective") for r in usable}
    if len(objectives) > 1:
        raise HpoError(f"the workers optimised different objectives: {sorted(map(str, objectives))}")
    if not usable:
        raise HpoError("no worker finished a trial: nothing to merge "
                       f"({', '.join(r['_file'] for r in results)})")
    best = max(usable, key=lambda r: r["best_value"])
    params = dict(best["best_params"])
    for key in ("optimizer", "batch_size"):
        # the learning rate was tuned for this optimizer and batch size: train with the same
        if key not in params and key in best.get("fixed_params", {}):
            params[key] = best["fixed_params"][key]
    return {
        "params": params,
        "value": best["best_value"],
        "objective": best.get("objective"),
        "objective_description": best.get("objective_description"),
        "metrics": best.get("best_metrics"),
        "source": best["_file"],
        "worker_index": best.get("worker_index"),
        "trial": best.get("best_trial"),
        "fixed_params": best.get("fixed_params"),
        "workers": [{"file": r["_file"], "worker_index": r.get("worker_index"), "best_value": r.get("best_value"),
                     "trial_counts": r.get("trial_counts"), "search_space": r.get("search_space")}
                    for r in results],
    }


def merged_text(merged: dict) -> str:
    lines = ["Best hyperparameters (Optuna search, merged over workers)", ""]
    for key, value in merged["params"].items():
        lines.append(f"{key} = {value:.6g}" if isinstance(value, float) else f"{key} = {value}")
    lines += ["", f"objective: {merged.get('objective_description') or merged.get('objective')}",
              f"best value: {merged['value']:.6f}"]
    if merged.get("metrics"):
        lines.append("validation mAP: {map}, mAP@0.5: {map_50}".format(**merged["metrics"]))
        if merged["metrics"].get("compliance_error_points") is not None:
            lines.append(f"validation compliance error: {merged['metrics']['compliance_error_points']:+.1f} points")
    lines.append(f"from: {merged['source']} (worker {merged.get('worker_index')}, trial {merged.get('trial')})")
    for worker in merged["workers"]:
        counts = worker.get("trial_counts") or {}
        lines.append(f"worker {worker.get('worker_index')}: best {worker.get('best_value')}, "
                     f"{counts.get('complete', 0)} complete, {counts.get('pruned', 0)} pruned, "
                     f"{counts.get('fail', 0)} failed ({worker['file']})")
    return "\n".join(lines) + "\n"
