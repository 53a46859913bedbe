"""bin/compare_runs.py on three small run folders whose configs differ in two keys."""

from __future__ import annotations

import csv
import io
import json

import pytest

from helpers import run_script
from run_folders import estimate_record, make_run_folder
from utils.cli import PLOT_FORMATS
from utils.reporting.compare import METRICS

BASE = {"epochs": 2, "image_size": 256, "train_stages": [{"epochs": 1, "lr": 0.02}, {"epochs": 3, "lr": 0.005}]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    small = make_run_folder(folder / "small", map_50=0.40, compliance_error=-3.0, config=BASE, wall_time_s=50,
                            figures=False)
    large = make_run_folder(folder / "large", map_50=0.60, compliance_error=1.0, wall_time_s=300, figures=False,
                            config={**BASE, "image_size": 512})
    slow_lr = make_run_folder(folder / "slow_lr", map_50=0.50, compliance_error=4.5, wall_time_s=120, figures=False,
                              config={**BASE, "train_stages": [BASE["train_stages"][0], {"epochs": 3, "lr": 0.001}]})
    return small, large, slow_lr


def table_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines if not line.startswith("| ---")]


def test_only_the_differing_settings_become_columns_sorted_by_the_metric(root, runs, capsys):
    assert run_script(root, "compare_runs", runs) == 0
    header, *rows = table_rows(capsys.readouterr().out)
    assert header == ["run", "status", "image_size", "train_stages.1.lr", *METRICS]
    assert [row[0] for row in rows] == ["large", "slow_lr", "small"]  # map_50 descending
    by_run = {row[0]: dict(zip(header, row)) for row in rows}
    assert by_run["large"]["image_size"] == "512" and by_run["slow_lr"]["train_stages.1.lr"] == "0.001"
    assert by_run["small"]["map_50"] == "0.4000" and by_run["small"]["compliance_error"] == "-3.00"
    assert by_run["large"]["wall_time_s"] == "300" and by_run["large"]["status"] == "finished"


def test_the_headline_estimate_and_its_interval_are_columns_beside_the_plain_count(root, tmp_path, capsys):
    # The table gave only the plain count of the kept boxes (compliance_predicted, compliance_error): a run whose
    # headline estimator read 80.1 % (70.5-88.0) against 75 % true showed the count's 72 % and -3 points.
    run = make_run_folder(tmp_path / "adjusted", compliance_error=-3.0, figures=False)
    evaluation_file = run / "outputs" / "evaluation.json"
    evaluation = json.loads(evaluation_file.read_text())
    evaluation["quantification"]["estimate"] = estimate_record("pacc2", 80.1, 70.5, 88.0, 6, 75.0)
    evaluation_file.write_text(json.dumps(evaluation))
    assert run_script(root, "compare_runs", [run, "--sort-by", "estimate_error"]) == 0
    header, row = table_rows(capsys.readouterr().out)
    values = dict(zip(header, row))
    assert [values[k] for k in ("compliance_true", "estimate", "estimate_low", "estimate_high", "estimate_error",
                                "compliance_predicted", "compliance_error")] == [
        "75.00", "80.10", "70.50", "88.00", "5.10", "72.00", "-3.00"]


def test_sort_order_and_every_output_format(root, runs, tmp_path, capsys):
    assert run_script(root, "compare_runs", [*runs, "--sort-by", "compliance_error", "--ascending",
                                             "--output", tmp_path / "runs.csv"]) == 0
    rows = list(csv.DictReader(io.StringIO((tmp_path / "runs.csv").read_text())))
    assert [row["run"] for row in rows] == ["small", "large", "slow_lr"]
    assert float(rows[0]["compliance_error"]) == -3.0 and rows[1]["image_size"] == "512"
    capsys.readouterr()
    assert run_script(root, "compare_runs", [*runs, "--sort-by", "wall_time_s", "--output", tmp_path / "runs.md",
                                             "--plot", tmp_path / "wall.png"]) == 0
    printed = capsys.readouterr().out
    markdown = (tmp_path / "runs.md").read_text()
    assert [row[0] for row in table_rows(markdown)[1:]] == ["large", "slow_lr", "small"]
    assert table_rows(markdown) == table_rows(printed)
    assert f"plot of wall_time_s: {tmp_path / 'wall.png'}" in printed
    assert (tmp_path / "wall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run_script(root, "compare_runs", [*runs, "--output", tmp_path / "runs.html"]) == 0
    page = (tmp_path / "runs.html").read_text()
    assert page.count("<tr>") == 4 and "<th>train_stages.1.lr</th>" in page


def test_missing_and_unfinished_runs_are_warned_and_said_in_their_row(root, runs, tmp_path, capsys):
    unfinished = make_run_folder(tmp_path / "unfinished", evaluation=False, statistics=False, figures=False,
                                 config=BASE)
    no_config = make_run_folder(tmp_path / "no_config", figures=False)
    assert run_script(root, "compare_runs", [*runs, unfinished, tmp_path / "gone", no_config]) == 0
    captured = capsys.readouterr()
    warnings = captured.err.splitlines()
    assert f"compare_runs: warning: {tmp_path / 'gone'}: run folder not found" in warnings
    assert (f"compare_runs: warning: {unfinished}: unfinished run (missing evaluation.json, statistics.json)"
            in warnings)
    header, *rows = table_rows(captured.out)
    by_run = {row[0]: dict(zip(header, row)) for row in rows}
    assert by_run["gone"]["status"] == "run folder not found" and by_run["gone"]["map_50"] == ""
    assert by_run["unfinished"]["status"] == "missing evaluation.json, statistics.json"
    assert [row[0] for row in rows][-2:] == ["unfinished", "gone"]  # no map_50: last
    assert ("- no config.yml: no_config; so every run's settings are rebuilt from its run records' params"
            in captured.out)


def test_a_rerun_runs_wall_time_is_said_to_be_the_last_reruns_alone(root, runs, tmp_path, capsys):
    # make run run again reuses every job and rewrites statistics.json: a 22-minute run read "0" unremarked.
    import json

    rerun = make_run_folder(tmp_path / "rerun", figures=False, config=BASE, wall_time_s=3)
    statistics = json.loads((rerun / "statistics.json").read_text())
    statistics["totals"].update(succeeded=1, reused=2)
    (rerun / "statistics.json").write_text(json.dumps(statistics))
    assert run_script(root, "compare_runs", [*runs, rerun]) == 0
    warnings = capsys.readouterr().err.splitlines()
    assert (f"compare_runs: warning: {rerun / 'statistics.json'}: wall_time_s 3 s is the last rerun's alone: "
            "2 of 3 jobs were reused from earlier runs, their time not in it") in warnings
    assert not any(str(run) in line for run in runs for line in warnings)  # runs that reused nothing: no note


def test_a_run_whose_result_files_cannot_be_read_says_so_in_its_row(root, runs, tmp_path, capsys):
    broken = make_run_folder(tmp_path / "broken", figures=False, config=BASE)
    (broken / "outputs" / "evaluation.json").write_text('{"map": ')
    (broken / "statistics.json").write_text("[1, 2]")
    assert run_script(root, "compare_runs", [*runs, broken]) == 0
    captured = capsys.readouterr()
    header, *rows = table_rows(captured.out)
    row = dict(zip(header, next(row for row in rows if row[0] == "broken")))
    assert row["status"] == "unreadable evaluation.json, statistics.json"  # it said "finished", every metric blank
    assert row["map_50"] == "" and f"{broken / 'outputs' / 'evaluation.json'}: evaluation is not valid JSON" \
        in captured.err


def test_bad_input_is_one_line(root, runs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run_script(root, "compare_runs", [tmp_path / "gone", tmp_path / "empty"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("compare_runs: error: no usable run among the 2 given") and err.count("\n") == 1
    assert run_script(root, "compare_runs", [*runs, "--sort-by", "accuracy"]) == 2
    assert capsys.readouterr().err.startswith("compare_runs: error: --sort-by 'accuracy': not a column")
    assert run_script(root, "compare_runs", [*runs, "--output", tmp_path / "runs.xlsx"]) == 2
    assert capsys.readouterr().err.startswith("compare_runs: error: --output")
    assert run_script(root, "compare_runs", [*runs, "--plot", tmp_path / "p.png", "--metric", "image_size"]) == 2
    assert "not a metric" in capsys.readouterr().err


def test_settings_a_run_record_carries_are_the_runs_configuration(tmp_path):
    import json

    from utils.reporting.run_folder import read_run_folder

    run_dir = make_run_folder(tmp_path / "carried", figures=False)
    record_file = run_dir / "outputs" / "model_run.json"
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({**record, "experiment_config": {**BASE, "image_size": 640}}))
    run = read_run_folder(run_dir)
    assert run.has_config_file and run.config_source == "model_run.json" and run.config["image_size"] == 640


def test_a_run_without_config_yml_is_compared_on_run_record_settings_for_every_run(root, runs, tmp_path, capsys):
    """config.yml keys and rebuilt keys differ in kind: mixing them would make every key 'differ'."""
    import json

    bare = make_run_folder(tmp_path / "bare", map_50=0.45, figures=False)
    record_file = bare / "outputs" / "model_run.json"
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({**record, "params": {**record["params"], "image_size": 640}}))
    assert run_script(root, "compare_runs", [runs[0], bare]) == 0
    out = capsys.readouterr().out
    header = table_rows(out)[0]
    # only the train job's image size differs between the two runs' records
    assert header == ["run", "status", "train.image_size", *METRICS]
    assert "no config.yml: bare; so every run's settings are rebuilt from its run records' params" in out


def test_nan_and_text_metrics_are_missing_and_sort_last_either_way(root, runs, tmp_path, capsys):
    import json

    def damaged(name, value, lr):
        run_dir = make_run_folder(tmp_path / name, map_50=0.45, figures=False, config={**BASE, "image_size": lr})
        evaluation = json.loads((run_dir / "outputs" / "evaluation.json").read_text())
        (run_dir / "outputs" / "evaluation.json").write_text(json.dumps({**evaluation, "map_50": value}))
        return run_dir

    nan_run, text_run = damaged("nan_run", float("nan"), float("nan")), damaged("text_run", "0.9", 300)
    for order in ([], ["--ascending"]):
        assert run_script(root, "compare_runs", [runs[0], nan_run, *runs[1:], text_run, *order]) == 0
        captured = capsys.readouterr()
        names = [row[0] for row in table_rows(captured.out)[1:]]
        expected = ["large", "slow_lr", "small"] if not order else ["small", "slow_lr", "large"]
        assert names == [*expected, "nan_run", "text_run"], order
        assert f"{text_run / 'outputs' / 'evaluation.json'}: map_50: '0.9' is not a number; left out" in captured.err
        assert f"{nan_run / 'outputs' / 'evaluation.json'}: map_50: nan is not a number; left out" in captured.err
    assert run_script(root, "compare_runs", [runs[0], nan_run, text_run, "--sort-by", "image_size",
                                             "--plot", tmp_path / "map_50.png", "--metric", "map_50"]) == 0
    out = capsys.readouterr().out
    assert [row[0] for row in table_rows(out)[1:]] == ["text_run", "small", "nan_run"]  # a NaN setting: last
    assert "(no value: text_run, nan_run)" in out


def test_flags_are_checked_before_any_run_is_read(root, runs, tmp_path, capsys):
    for plot in ("p.txt", "noext"):  # argparse's plot_path: usage, then the one error line
        with pytest.raises(SystemExit) as exit_info:
            run_script(root, "compare_runs", [*runs, "--plot", tmp_path / plot])
        assert exit_info.value.code == 2
        captured = capsys.readouterr()
        assert "| run |" not in captured.out
        formats = ", ".join(PLOT_FORMATS)
        # the value as the CLI quotes it: a long one shortened in the middle (pytest's tmp_path under xdist)
        line = captured.err.splitlines()[-1]
        assert f"error: argument --plot: expected a plot file ending in {formats}, got '/" in line
        assert line.endswith(f"/{plot}'")
    assert run_script(root, "compare_runs", [*runs, "--metric", "bogus"]) == 2
    captured = capsys.readouterr()
    assert "| run |" not in captured.out
    assert captured.err.startswith("compare_runs: error: --metric 'bogus': not a metric")
    assert captured.err.count("\n") == 1
    assert not (tmp_path / "p.txt").exists() and not (tmp_path / "noext").exists()


def test_a_run_given_twice_is_compared_once(root, runs, capsys):
    small = runs[0]
    again = small.parent / ".." / small.parent.name / small.name
    assert run_script(root, "compare_runs", [small, runs[1], small, again]) == 0
    captured = capsys.readouterr()
    assert [row[0] for row in table_rows(captured.out)[1:]] == ["large", "small"]
    assert f"compare_runs: warning: {small}: run given again; compared once" in captured.err
    assert f"compare_runs: warning: {small}: run given again, as {again}; compared once" in captured.err


def test_a_run_name_with_dollar_signs_is_plotted_as_text(root, runs, tmp_path, capsys):
    import shutil

    odd = tmp_path / "r$\\frac{$"
    shutil.copytree(runs[0], odd)
    shutil.copytree(runs[1], tmp_path / "$x$")
    (odd / "outputs" / "evaluation.json").unlink()  # no value: its name goes into the title
    assert run_script(root, "compare_runs", [odd, tmp_path / "$x$", runs[2], "--plot", tmp_path / "p.png"]) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_setting_with_a_line_break_or_a_pipe_stays_in_its_markdown_cell(tmp_path, capsys, root):
    """A YAML string may hold a line break: it ended the table row, where now it is shown as an escape."""
    plain = make_run_folder(tmp_path / "plain", map_50=0.4, config={**BASE, "note": "a"}, figures=False)
    odd = make_run_folder(tmp_path / "odd", map_50=0.5, config={**BASE, "note": "two\nlines | a\\|b"}, figures=False)
    assert run_script(root, "compare_runs", [plain, odd]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert len(table) == 4 and all(line.endswith(" |") for line in table)  # header, rule, two rows
    header = table[0].split(" | ")
    assert "note" in table[0] and len(table[2].split(" | ")) == len(header)
    assert "two\\nlines \\| a\\\\\\|b" in table[2]


def test_runs_evaluated_on_different_test_sets_are_said_to_be(root, runs, tmp_path, capsys):
    """Another data set, split or label map gives another test set: the metrics then differ by it too, which the
    table said nowhere (its settings columns may not show the data at all)."""
    other = make_run_folder(tmp_path / "other_data", map_50=0.9, num_images=10, config=BASE, figures=False)
    assert run_script(root, "compare_runs", [*runs, other, "--output", tmp_path / "runs.html"]) == 0
    captured = capsys.readouterr()
    said = "the runs were evaluated on different test sets"
    assert f"compare_runs: warning: {said}" in captured.err
    assert "other_data: 10 images" in captured.err and "small: 6 images" in captured.err
    assert f"- {said}" in captured.out and said in (tmp_path / "runs.html").read_text()
    assert run_script(root, "compare_runs", runs) == 0  # the same test set: nothing said
    assert said not in capsys.readouterr().err


def test_long_run_names_are_cut_in_the_plot_and_each_run_keeps_its_bar(root, tmp_path, monkeypatch):
    """Run names (the path as given where two runs share a folder name) were drawn whole under their bars, running
    into each other; cut (figure_label), two names alike at both ends drew one bar by name, the other hidden."""
    import matplotlib.pyplot as plt

    from utils.figures import FIGURE_LABEL_CHARS

    middle = "x" * 80
    first = make_run_folder(tmp_path / f"site_a_{middle}" / "run", map_50=0.4, config=BASE, figures=False)
    second = make_run_folder(tmp_path / f"site_b_{middle}" / "run", map_50=0.6, config=BASE, figures=False)
    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig) or close(fig))
    assert run_script(root, "compare_runs", [first, second, "--metric", "map_50", "--plot", tmp_path / "p.png"]) == 0
    (ax,) = figures[0].axes
    labels = [tick.get_text() for tick in ax.get_xticklabels()]
    assert len(labels) == 2 and all(len(label) <= FIGURE_LABEL_CHARS for label in labels)
    assert sorted(bar.get_height() for bar in ax.patches) == pytest.approx([0.4, 0.6])
