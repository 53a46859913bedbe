"""Run records (utils.provenance.run_record): the inputs' hash follows their content, and records and model files
say which code made them."""

from __future__ import annotations

from utils.provenance import inputs_sha256, run_record


def test_run_record_hash_changes_with_content(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("1")
    first = run_record("job", {"seed": 1}, [a])
    a.write_text("2")
    second = run_record("job", {"seed": 1}, [a])
    assert first["inputs_sha256"] != second["inputs_sha256"] == inputs_sha256([a])
    assert first["packages"]["torch"] and first["params"] == {"seed": 1}


def test_run_records_and_model_files_say_which_code_made_them(tmp_path, monkeypatch):
    """The package version stays 0.1.0 through every edit of a checkout: one hash over the sources tells two
    runs' code apart."""
    import utils.provenance as provenance
    from utils.detection.model import build_model
    from utils.detection.model_file import model_metadata

    record = run_record("job", {"seed": 1})
    assert record["code"] == provenance.code_version() and record["code"]["version"] == "0.1.0"
    assert len(record["code"]["sources_sha256"]) == 64
    assert model_metadata(build_model("mobilenet_v2_fpn", weights="none", image_size=128))["code"] == record["code"]
    for name, text in (("workflow.py", "w"), ("bin/job.py", "j"), ("utils/data/part.py", "p")):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(provenance, "SOURCE_ROOT", tmp_path)
    sources = provenance.code_version.__wrapped__  # uncached
    first = sources()["sources_sha256"]
    (tmp_path / "utils" / "__pycache__").mkdir()
    (tmp_path / "utils" / "__pycache__" / "part.cpython-311.pyc").write_bytes(b"compiled")
    (tmp_path / "README.md").write_text("not code")
    assert sources()["sources_sha256"] == first
    (tmp_path / "utils" / "data" / "part.py").write_text("p2")
    assert sources()["sources_sha256"] != first
    (tmp_path / "utils" / "data" / "part.py").write_text("p")
    (tmp_path / "utils" / "data" / "part.py").rename(tmp_path / "utils" / "data" / "other.py")
    assert sources()["sources_sha256"] != first


def test_inputs_hash_follows_the_files_not_the_folders_they_were_unpacked_into(tmp_path):
    """A train job unpacks its training and validation archives into randomly named folders: the record's hash
    must not depend on which of the two folder names sorts first."""
    files = {}
    for folder, name, text in (("b_train", "t.jpg", "1"), ("a_val", "v.jpg", "2"),
                               ("a_train", "t.jpg", "1"), ("b_val", "v.jpg", "2")):
        path = tmp_path / folder / name
        path.parent.mkdir()
        path.write_text(text)
        files[folder] = path
    first = run_record("train", {}, [files["b_train"], files["a_val"]])["inputs_sha256"]
    second = run_record("train", {}, [files["a_train"], files["b_val"]])["inputs_sha256"]
    assert first == second
    files["b_val"].write_text("3")
    assert run_record("train", {}, [files["a_train"], files["b_val"]])["inputs_sha256"] != first


def test_run_record_says_how_many_threads_torch_computed_with():
    """On a CPU a seed's results are bit-identical only at one thread count, which the executor sets from the jobs
    running side by side: the record keeps it, so that two runs' differences can be told apart."""
    import torch

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert run_record("job", {})["threads"] == 1
    finally:
        torch.set_num_threads(previous)


def test_the_weights_file_recorded_is_the_one_the_flags_load():
    """hpo's record hashes the starting weights' file by its flags as build_model reads them: --weights none sets a
    --weights-file aside (the record named it among the inputs), --weights PATH names one itself."""
    from utils.detection.weights import weights_file_given

    assert weights_file_given("none", "w.pt") is None
    assert weights_file_given("imagenet", "w.pt") == weights_file_given(None, "w.pt") == "w.pt"
    assert weights_file_given("runs/w.pt", None) == "runs/w.pt"
    assert weights_file_given("coco", None) is None
