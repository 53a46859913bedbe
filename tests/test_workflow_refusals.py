"""workflow.py refusing a (re)generation: every check runs before the first file is written, a bad sites.yml or
properties file is one line naming it, and a regeneration stopped part way leaves no DAG over the new data."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import workflow as generator
from helpers import generate
from utils import defaults as D
from utils.executor import load_workflow


# -- a refused (re)generation writes nothing -----------------------------------------------------------------


def snapshot(folder: Path) -> dict:
    return {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def generated_once(sample_dir, tmp_path_factory):
    """A run folder generated with the defaults (seed 42), its files' bytes and times, and odd inputs."""
    folder = tmp_path_factory.mktemp("regenerate")
    assert generate(folder / "run", sample_dir, "--no-pretrained") == 0
    (folder / "file.jpg").write_bytes((next((sample_dir / "images").iterdir())).read_bytes())
    (folder / "empty").mkdir()
    (folder / "shards").mkdir()
    (folder / "shards" / "index.json").write_text("{}")
    return folder, snapshot(folder / "run")


REFUSED = [
    (["--pred-images", "MISSING"], "{MISSING}: --pred-images folder not found"),
    (["--pred-images", "FILE"], "{FILE}: not a folder (--pred-images takes a folder of images, or of shards"),
    (["--pred-images", "EMPTY"], "{EMPTY}: no images to predict on"),
    (["--pred-images", "SHARDS"], "index.json: not a shard index"),
    (["--pred-videos", "MISSING"], "{MISSING}: --pred-videos folder not found"),
    (["--pred-videos", "FILE"], "{FILE}: not a folder (--pred-videos takes a folder of videos)"),
    (["--pred-videos", "EMPTY"], "{EMPTY}: no videos"),
    (["--folds", "40"], "--folds 40: the train split has only"),
    (["--fractions", "1", "0", "0"], "--fractions 1 0 0: the val split of the 24 usable images would be empty"),
    (["--properties", "MISSING"], "{MISSING}: properties file not found"),
    (["--data", "MISSING"], "not found (--data must contain images/ and annotations/)"),
]


@pytest.mark.parametrize(("flags", "words"), REFUSED, ids=[" ".join(flags) for flags, _ in REFUSED])
def test_a_refused_regeneration_leaves_the_run_folder_as_it_was(generated_once, sample_dir, flags, words, capsys):
    """Every check runs before the first file is written: once split.csv was rewritten for --seed 7 while
    workflow.yml kept seed 42."""
    folder, before = generated_once
    paths = {"MISSING": folder / "missing", "FILE": folder / "file.jpg", "EMPTY": folder / "empty",
             "SHARDS": folder / "shards"}
    argv = [str(paths.get(flag, flag)) for flag in flags]
    for run_dir in (folder / "run", folder / "fresh"):
        assert generate(run_dir, sample_dir, "--no-pretrained", "--seed", "7", *argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("workflow.py: ") and words.format(**paths) in err and err.count("\n") == 1, err
        assert "folder not found" not in err or "MISSING" in words
    assert snapshot(folder / "run") == before
    assert not (folder / "fresh").exists()


# -- sites.yml and the properties file: checked whole, before anything is written ---------------------------

POOL = "sites:\n  condorpool:\n"
# (sites.yml text after the project's execution_site/container lines, words of the one error line)
BAD_SITES = [
    (POOL + "    max_job_minute: 10\n", "sites.condorpool.max_job_minute: unknown key (did you mean max_job_minutes?)"),
    ("local:\n  shared_scrach: /tmp\n", "local.shared_scrach: unknown key (did you mean shared_scratch?)"),
    ("container:\n  tpye: docker\n", "container.tpye: unknown key (did you mean type?)"),
    ("executon_site: condorpool\n", "executon_site: unknown key (did you mean execution_site?)"),
    (POOL + "    runtimes: '36000'\n", "sites.condorpool: runtimes: '36000' is not a mapping of job kind -> seconds"),
    (POOL + "    runtimes: [36000]\n", "sites.condorpool: runtimes: [36000] is not a mapping of job kind"),
    (POOL + "    runtimes: {train: true}\n", "sites.condorpool: runtimes: train: True is not a positive number"),
    (POOL + "    runtimes: {trian: 60}\n", "runtimes: unknown job kind 'trian'"),
    (POOL + "    max_job_minutes: true\n", "sites.condorpool: max_job_minutes True must be a whole number"),
    (POOL + "    data_configuration: magic\n",
     "sites.condorpool.data_configuration: 'magic' is not one of sharedfs, nonsharedfs, condorio"),
    # a pool site gets no shared scratch or staging site in the catalog: the planner failed on both ('File Server
    # not specified for shared-scratch filesystem for site: condorpool')
    (POOL + "    data_configuration: sharedfs\n",
     "sites.condorpool.data_configuration: 'sharedfs' needs a shared scratch folder"),
    (POOL + "    data_configuration: nonsharedfs\n",
     "sites.condorpool.data_configuration: 'nonsharedfs' needs a shared scratch folder (and for nonsharedfs a "
     "staging site) that the generated site catalog does not give a pool site; use condorio"),
    (POOL + "    arch: z80\n", "sites.condorpool.arch: 'z80' is not one of"),
    (POOL + "    software_dir: relative/dir\n", "sites.condorpool.software_dir: 'relative/dir' must be an absolute"),
    ("local:\n  shared_scratch: 5\n", "local.shared_scratch: 5 is not text"),
    ("container:\n  type: podman\n", "container.type: 'podman': choose singularity, docker or none"),
    ("container:\n  image: maskdetection/x:1\n", "container.image: 'maskdetection/x:1': must start with docker://"),
    ("execution_site: nowhere\n", "execution_site: 'nowhere': not a site of"),
]


def test_one_sites_yml_serves_runs_with_and_without_folds(sample_dir, tmp_path):
    # A runtimes: entry for the fold jobs is used with --folds and has no effect without (no job of that kind).
    plain = tmp_path / "plain.yml"
    plain.write_text(f"execution_site: condorpool\ncontainer: {{type: singularity, image: {D.CONTAINER_IMAGE}}}\n"
                     "sites: {condorpool: {arch: x86_64}}\n")
    sites = tmp_path / "folds.yml"
    sites.write_text(plain.read_text().replace("{arch: x86_64}", "{arch: x86_64, runtimes: {train_fold: 4321}}"))
    for where, config in (("a", plain), ("b", sites)):  # one run name in two places: the report job is given it
        assert generate(tmp_path / where / "run", sample_dir, "--sites-config", str(config), "--no-pretrained") == 0

    def lines(where: str, name: str) -> list[str]:
        text = (tmp_path / where / "run" / name).read_text().replace(str((tmp_path / where).resolve()), "HERE")
        return [line for line in text.splitlines() if "createdOn" not in line]

    for name in ("workflow.yml", "transformations.yml"):
        assert lines("a", name) == lines("b", name), name
    assert generate(tmp_path / "c", sample_dir, "--sites-config", str(sites), "--no-pretrained", "--folds", "2") == 0
    written = [(tmp_path / "c" / name).read_text() for name in ("workflow.yml", "transformations.yml")]
    assert any("4321" in text for text in written)


@pytest.mark.parametrize(("text", "words"), BAD_SITES, ids=[words.split(":")[0] + str(i)
                                                            for i, (_, words) in enumerate(BAD_SITES)])
def test_a_bad_sites_yml_is_one_line_naming_it_and_nothing_is_written(text, words, sample_dir, tmp_path, capsys):
    sites = tmp_path / "my-sites.yml"
    sites.write_text(f"execution_site: condorpool\ncontainer: {{type: singularity, image: {D.CONTAINER_IMAGE}}}\n"
                     f"sites: {{condorpool: {{arch: x86_64}}}}\n")
    assert generate(tmp_path / "ok", sample_dir, "--sites-config", str(sites), "--no-pretrained") == 0
    capsys.readouterr()
    top = {key: value for key, value in yaml.safe_load(sites.read_text()).items()}
    top.update(yaml.safe_load(text))
    sites.write_text(yaml.safe_dump(top))
    assert generate(tmp_path / "run", sample_dir, "--sites-config", str(sites), "--no-pretrained") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"workflow.py: {sites}: ") and words in err and err.count("\n") == 1, err
    assert "--container" not in err and "--execution-site" not in err  # flags the user never gave
    assert not (tmp_path / "run").exists()


def test_a_site_without_a_flag_or_file_is_read_as_text_and_unreadable_files_are_one_line(sample_dir, tmp_path,
                                                                                        capsys):
    binary = tmp_path / "binary.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    malformed = tmp_path / "malformed.conf"
    malformed.write_text("dagman.retry = 3\njust some words\n")
    bad_mode = tmp_path / "mode.conf"
    bad_mode.write_text("pegasus.mode = fast\n")
    for flags, words in ((["--sites-config", binary], f"{binary}: cannot read the sites configuration (not UTF-8"),
                         (["--properties", binary], f"{binary}: cannot read the properties file (not UTF-8"),
                         (["--properties", malformed], f"{malformed}: not a properties file of key = value lines"),
                         (["--properties", tmp_path], f"{tmp_path}: cannot read the properties file (Is a directory"),
                         (["--properties", tmp_path / "none.conf"], f"{tmp_path / 'none.conf'}: properties file not"),
                         (["--properties", bad_mode], f"{bad_mode}: pegasus.mode 'fast': not one of production, "),
                         (["--mode", "garbage"], "--mode 'garbage': not one of production, development")):
        assert generate(tmp_path / "run", sample_dir, "--no-pretrained", *map(str, flags)) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith(f"workflow.py: {words}") and err.count("\n") == 1, err
        assert not (tmp_path / "run").exists()
    assert generate(tmp_path / "run", sample_dir, "--no-pretrained", "--mode", "development") == 0


@pytest.mark.parametrize("line", ["dagman.retry = abc", "dagman.retry = -2", "pegasus.transfer.threads = 0",
                                  "dagman.retry = ²", "dagman.retry = ٣"])  # digits to str.isdigit, not to DAGMan
def test_a_properties_count_that_is_not_a_whole_number_is_one_line(line, sample_dir, tmp_path, capsys):
    # dagman.retry = abc was written into the DAG ('RETRY create_dir... abc', which DAGMan cannot parse) and the
    # local executor ended in a traceback (int('abc'))
    properties = tmp_path / "my.conf"
    properties.write_text(f"pegasus.mode = production\n{line}\n")
    assert generate(tmp_path / "run", sample_dir, "--no-pretrained", "--properties", str(properties)) == 2
    err = capsys.readouterr().err
    key, value = line.split(" = ")
    least = 0 if key == "dagman.retry" else 1
    assert err == f"workflow.py: {properties}: {key} '{value}': not a whole number of at least {least}\n"
    assert not (tmp_path / "run").exists()


def test_a_regeneration_stopped_part_way_leaves_no_dag_over_the_new_data(sample_dir, tmp_path, monkeypatch):
    """Ctrl-C (or a full disk) while the shards are packed, after split.csv was rewritten for --seed 7: the last
    workflow.yml (seed 42, the old shards) stayed, and python -m utils.executor RUN_DIR or the printed pegasus-plan
    ran it over the new split. The DAG goes before the first data file is written and comes back last."""
    from utils.executor import WorkflowError

    run_dir = tmp_path / "run"
    assert generate(run_dir, sample_dir, "--no-pretrained") == 0
    load_workflow(run_dir)

    def interrupted(*args, **kwargs):
        assert (run_dir / "split.csv").is_file()  # the data files are being rewritten
        raise KeyboardInterrupt

    monkeypatch.setattr(generator, "prediction_shards", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate(run_dir, sample_dir, "--no-pretrained", "--seed", "7")
    assert not (run_dir / "workflow.yml").exists()
    with pytest.raises(WorkflowError):
        load_workflow(run_dir)
    monkeypatch.undo()
    # nor over the last run's config.yml (the settings compare_runs and the report show), written after the DAG
    monkeypatch.setattr(generator.experiment, "write_effective_config", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate(run_dir, sample_dir, "--no-pretrained", "--seed", "7")
    assert not (run_dir / "workflow.yml").exists()
    monkeypatch.undo()
    assert generate(run_dir, sample_dir, "--no-pretrained", "--seed", "7") == 0
    assert load_workflow(run_dir).jobs
