"""YAML read from users is bounded (utils/safe_yaml.py): the issue's alias bomb under a known key is refused
in well under a second with one line, exit 2, wherever such YAML is read; ordinary anchors still load; a value
quoted in a message is shortened (utils.errors.shown) (issue #23)."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc

import pytest
import yaml

from helpers import REFUSAL_MB, peak_mb
from utils import defaults as D, safe_yaml
from utils.errors import InputError, shown


def alias_bomb(key: str, levels: int = 9) -> str:
    """Nine levels of nine aliases each: 9**9 (387 M) strings once expanded, 800 bytes on disk."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
    return f"{key}:\n" + "\n".join("  " + line for line in lines) + "\n"


def test_the_bomb_is_refused_before_it_expands_with_one_line():
    tracemalloc.start()
    with pytest.raises(yaml.YAMLError, match=f"expands to more than {D.YAML_MAX_NODES:,} values") as caught:
        safe_yaml.load(alias_bomb("fractions"))
    assert peak_mb() < REFUSAL_MB and "\n" not in str(caught.value)


@pytest.mark.slow  # over 5 s on a quiet 2-core machine
def test_merge_key_bombs_recursive_aliases_and_deep_nesting_are_refused():
    merges = "m0: &m0 {a: 1, b: 2, c: 3}\n" + "".join(
        f"m{i}: &m{i}\n  <<: [{', '.join([f'*m{i - 1}'] * 9)}]\n  k{i}: 1\n" for i in range(1, 9))
    for text, words in ((merges, "expands to more than"), ("a: &a [1, *a]\n", "recursive alias"),
                        ("[" * 100_000 + "]" * 100_000, "nested more than 100 deep"),
                        ("a:\n" + "".join(" " * level + "- \n" for level in range(1, 1500)), "nested too deeply")):
        tracemalloc.start()
        with pytest.raises(safe_yaml.YamlTooLarge, match=words):
            safe_yaml.load(text)
        assert peak_mb() < REFUSAL_MB



def test_a_long_string_aliased_thousands_of_times_is_refused_by_its_characters():
    """9000 aliases of one 100 KB string are 9000 values, under the node limit, but ~1 GB of text once expanded:
    the character budget refuses it as composed; a few aliases of it (300 KB) still load."""
    long_string = '"' + "x" * 100_000 + '"'
    text = f"a: &x {long_string}\nb: [" + ", ".join(["*x"] * 9000) + "]\n"
    assert 9000 < D.YAML_MAX_NODES and 9000 * 100_000 > D.YAML_MAX_CHARS
    tracemalloc.start()
    with pytest.raises(safe_yaml.YamlTooLarge, match=f"more than {D.YAML_MAX_CHARS:,} characters") as caught:
        safe_yaml.load(text)
    assert peak_mb() < REFUSAL_MB and "\n" not in str(caught.value)
    assert safe_yaml.load(f"a: &x {long_string}\nb: [*x, *x]\n")["b"] == ["x" * 100_000] * 2


@pytest.mark.slow  # over 5 s on a quiet 2-core machine
def test_generated_files_load_at_any_written_size_but_not_beyond_by_aliases():
    """generated=True (a workflow's catalogs, which list every input) lifts both bounds to the text's own length."""
    written_out = "files:\n" + "".join(f"  - {{lfn: f{index}.jpg, pfn: /data/f{index}.jpg}}\n" for index in range(5000))
    with pytest.raises(safe_yaml.YamlTooLarge):
        safe_yaml.load(written_out)  # 25,000 values: over the limit of a user's file
    assert len(safe_yaml.load(written_out, generated=True)["files"]) == 5000
    with pytest.raises(safe_yaml.YamlTooLarge, match="values once its aliases"):
        safe_yaml.load(written_out + alias_bomb("bomb"), generated=True)


def test_values_pyyaml_cannot_construct_are_yaml_errors_not_tracebacks(tmp_path):
    """A 5000-digit integer (over Python's 4300-digit conversion limit) or a date like 2024-13-45 made PyYAML
    raise a plain ValueError, past every caller's `except yaml.YAMLError`; the same integer in JSON too."""
    from utils.detection.stages import StagesError, parse_stages

    for text, words in ((f"epochs: {'9' * 5000}\n", "4300 digits"), ("when: 2024-13-45\n", "month must be")):
        with pytest.raises(safe_yaml.YamlValueError, match=words):
            safe_yaml.load(text)
    stages = tmp_path / "stages.yml"
    stages.write_text(f"- epochs: {'9' * 5000}\n")
    for given in (str(stages), f"[{{\"epochs\": {'9' * 5000}}}]"):
        with pytest.raises(StagesError, match="4300 digits") as caught:
            parse_stages(given)
        assert "\n" not in str(caught.value) and len(str(caught.value)) < 400

def test_ordinary_anchors_and_merge_keys_still_load():
    text = "base: &base {epochs: 2, lr: 0.01}\nfirst:\n  <<: *base\n  name: a\nsecond: [*base, *base]\n"
    assert safe_yaml.load(text) == {"base": {"epochs": 2, "lr": 0.01}, "first": {"epochs": 2, "lr": 0.01, "name": "a"},
                                    "second": [{"epochs": 2, "lr": 0.01}] * 2}
    with pytest.raises(TypeError):
        safe_yaml.load("a: 1", Loader=yaml.UnsafeLoader)


def test_workflow_refuses_an_experiment_file_holding_the_bomb_under_a_known_key(root, tmp_path):
    import workflow

    path = tmp_path / "bomb.yml"
    path.write_text("epochs: 2\n" + alias_bomb("fractions"))
    tracemalloc.start()
    with pytest.raises(SystemExit) as stopped:
        workflow.get_args_parser().parse_args(["--config", str(path)])
    assert stopped.value.code == 2 and peak_mb() < REFUSAL_MB
    proc = subprocess.run([sys.executable, "workflow.py", "--config", str(path)], cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(f"workflow.py: {path}: not valid YAML (the value starting at line")


def test_sites_stages_and_job_settings_files_are_bounded_too(tmp_path):
    from utils.detection.stages import StagesError, parse_stages
    from utils.pegasus.config import ConfigError, load_sites_config
    from utils.provenance import EXPERIMENT_CONFIG_FILE, experiment_config

    sites = tmp_path / "sites.yml"
    sites.write_text(alias_bomb("sites"))
    stages = tmp_path / "stages.yml"
    stages.write_text(alias_bomb("stages"))
    (tmp_path / EXPERIMENT_CONFIG_FILE).write_text(alias_bomb("epochs"))
    for read, error in ((lambda: load_sites_config(sites), ConfigError),
                        (lambda: parse_stages(str(stages)), StagesError),
                        (lambda: experiment_config(tmp_path), InputError)):
        tracemalloc.start()
        with pytest.raises(error, match="expands to more than") as caught:
            read()
        assert peak_mb() < REFUSAL_MB and "\n" not in str(caught.value)


def test_a_value_quoted_in_a_message_is_bounded_however_large():
    huge = [[["lol"] * 1000] * 1000] * 1000  # a billion items, shared, as an alias bomb builds them
    tracemalloc.start()
    text = shown(huge)
    assert len(text) <= 80 and text.startswith("[[[") and peak_mb() < REFUSAL_MB
    assert shown("x" * 10_000).endswith("...'") or len(shown("x" * 10_000)) <= 80
    assert shown(7.0) == "7.0" and shown("abc") == "'abc'"
    # an integer over Python's 4300 digits has no repr at all: its size is shown, alone or inside a value
    assert shown(10**5000) == "<an integer of 4153 hex digits>"
    assert shown({"epochs": [10**5000, 2]}) == "{'epochs': [<an integer of 4153 hex digits>, 2]}"


def test_messages_about_stages_sites_and_runtimes_quote_values_bounded(tmp_path):
    """A stages file with epochs as a 5000-item list once gave a 28,951-character message: every value a user
    gave is quoted through shown(), in the stages, sites.yml, --container-image and runtime checks alike."""
    from utils.detection.stages import StagesError, parse_stages
    from utils.pegasus.config import ConfigError, enum_value, load_sites_config, validate_container_image
    from utils.pegasus.runtimes import checkpoint_minutes

    long_text = "z" * 5000
    stages = [{"epochs": list(range(5000))}, {"epochs": 1, "lr": [0.1] * 5000}, {"epochs": 1, "name": [1] * 5000},
              {"epochs": 1, "trainable_layers": "9" * 5000}, {"epochs": 1, long_text: 1}]
    sites = tmp_path / "sites.yml"
    long_key = long_text[:1000]  # YAML's longest plain key
    sites.write_text(f"sites:\n  {long_key}:\n    profiles:\n      {long_key}: {{a: 1}}\n")
    from Pegasus.api import Arch
    checks = [*((lambda stage=stage: parse_stages([stage]), StagesError) for stage in stages),
              (lambda: load_sites_config(sites), ConfigError),
              (lambda: validate_container_image("docker://" + long_text), ConfigError),
              (lambda: enum_value(Arch, long_text, "sites.yml: arch"), ConfigError),
              (lambda: checkpoint_minutes(600, [1] * 5000), ConfigError)]
    for check, error in checks:
        with pytest.raises(error) as caught:
            check()
        assert len(str(caught.value)) < 300 and "\n" not in str(caught.value), str(caught.value)[:300]

@pytest.mark.parametrize(("script", "argv", "words"), [
    ("aggregate_folds", ["--inputs", "DEEP", "--output-dir", "OUT"], "not an evaluation.json"),
    ("hpo_merge", ["--inputs", "DEEP"], "HPO result is nested too deeply to read"),
    ("merge_predictions", ["--inputs", "DEEP", "--output-dir", "OUT"], "not a predictions file"),
    ("make_shards", ["--verify", "--output", "SHARDS"], "not a shard index"),
    ("train", ["--images", "OUT", "--annotations", "OUT", "--output", "OUT/m.pt", "--stages", "DEEP"],
     "does not parse"),
])
def test_json_nested_deeper_than_pythons_stack_is_one_line_too(root, tmp_path, capsys, script, argv, words):
    """json's decoder recurses once per bracket: 100 000 of them end in a RecursionError, said as bad input."""
    from helpers import load_script
    from utils.cli import run_job

    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "index.json").write_text(deep.read_text())
    replace = {"DEEP": str(deep), "OUT": str(tmp_path), "OUT/m.pt": str(tmp_path / "m.pt"),
               "SHARDS": str(tmp_path / "shards")}
    module = load_script(root, script)
    assert run_job(module.main, module.get_args_parser(), [replace.get(a, a) for a in argv], job=script) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "Traceback" not in err, err
