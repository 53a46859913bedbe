"""Helpers shared by several test modules (imported like tests/pegasus_schemas.py)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A refusal of a bomb (an alias bomb, a decompression bomb) comes before the expansion: what it allocates at the
# peak stays at a few MB, where the expansion takes hundreds of MB or GBs. Counted in allocations (tracemalloc),
# not in seconds, which a loaded machine changes.
REFUSAL_MB = 32


def peak_mb() -> float:
    """MB allocated at the peak since tracemalloc.start(), which it stops (conftest.py stops it after a test
    that failed before calling this)."""
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


# runs each argv as the script's __main__ in one process, as the jobs run, then says whether torch was imported
_RUN_ALL = ("import runpy, sys\n"
            "for argv in sys.argv[1:]:\n"
            "    sys.argv = argv.split()\n"
            "    try:\n"
            "        runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "    except SystemExit as end:\n"
            "        print('exit', end.code)\n"
            "print('loaded:', sorted(m for m in ('torch', 'torchvision') if m in sys.modules))\n")


def run_in_one_process(argvs) -> tuple[list[str], list[str]]:
    """(each job's "exit N" line then "loaded: [...]", naming torch and torchvision if any job imported them; the
    error lines, usage lines left out) of running each argv ("bin/train.py --flag value", split on spaces) as the
    script's __main__ in one Python process: the check that a refusal comes before torch's import."""
    done = subprocess.run([sys.executable, "-c", _RUN_ALL, *argvs], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    ends = [line for line in done.stdout.splitlines() if line.startswith(("exit ", "loaded: "))]  # not args lines
    errors = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    return ends, errors


def load_script(root, name):
    """Import bin/<name>.py as a module so tests call its get_args_parser() and main() in-process."""
    spec = importlib.util.spec_from_file_location(f"bin_{name}", Path(root) / "bin" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_bench(name):
    """Import bench/<name>.py as a module (its bench/ siblings importable, as when run) so tests call its functions."""
    bench = Path(__file__).resolve().parents[1] / "bench"
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", bench / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(root, name, argv) -> int:
    """Run bin/<name>.py in-process as its __main__ does, through the job runner; return the exit code."""
    from utils.cli import run_job

    script = load_script(root, name)
    return run_job(script.main, script.get_args_parser(), [str(arg) for arg in argv])


def count_opens(monkeypatch, folder) -> dict:
    """Count, per file below *folder*, the times the process opens it (builtins.open and io.open: Pillow's,
    torch.load's, file_sha256's, pathlib's); returns the counts, filled as the files are opened."""
    import builtins
    import io
    import os

    opens, real_open, inside = {}, builtins.open, os.path.abspath(folder) + os.sep

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(file).startswith(inside):
            opens[os.path.abspath(file)] = opens.get(os.path.abspath(file), 0) + 1
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    return opens


def make_train_val(root, num_train: int = 4, num_val: int = 3, size: int = 96):
    """root/train and root/val of tiny synthetic images (seeds 21 and 22): the small sets of the hpo and
    train tests; returns *root*."""
    from utils.data.sample_data import make_sample_dataset

    make_sample_dataset(root / "train", num_images=num_train, seed=21, image_size=(size, size))
    make_sample_dataset(root / "val", num_images=num_val, seed=22, image_size=(size, size))
    return root


# P(a true face of class i, row, is kept and labelled j, column); the rest of each row is missed.
# with_mask is found more often than the others, and incorrectly worn masks are mostly called with_mask:
# the pattern that makes counting over-state compliance on the real data.
DETECTOR_RATES = ((0.70, 0.05, 0.00), (0.10, 0.55, 0.00), (0.35, 0.10, 0.20))
FALSE_BOXES = (0.3, 0.1, 0.02)  # mean spurious boxes per image, per predicted class


def simulated_labelled_images(rng, images: int, shares=(0.5, 0.4, 0.1), rates=DETECTOR_RATES) -> list[dict]:
    """Labelled image records as utils.detection.quantify.calibration_image writes them, drawn from a
    detector with *rates* (DETECTOR_RATES' form) and FALSE_BOXES on faces of the true class mix *shares*."""
    import numpy as np

    rates = np.asarray(rates)
    records = []
    for _ in range(images):
        truth_classes = rng.choice(3, size=int(rng.integers(1, 7)), p=shares)
        confusion, soft = np.zeros((4, 4), dtype=int), np.zeros((4, 3))
        for true in truth_classes:
            outcome = np.append(rates[true], 1 - rates[true].sum())
            confusion[true][rng.choice(4, p=outcome)] += 1
            soft[true] += rng.dirichlet(1 + 6 * outcome)[:3]
        for predicted, mean in enumerate(FALSE_BOXES):
            spurious = rng.poisson(mean)
            confusion[3][predicted] += spurious
            soft[3][predicted] += 0.6 * spurious
        records.append({"truth": np.bincount(truth_classes, minlength=3).tolist(), "confusion": confusion.tolist(),
                        "soft": soft.tolist()})
    return records


def calibrated_model_file(model_file, path, score_threshold: float, images: int = 20, working_size=None,
                          chosen_size=None) -> Path:
    """A copy of *model_file* whose meta holds a validation record (quantify.calibration_record's form,
    from simulated_labelled_images) at *score_threshold*, as bin/train.py stores it; measured at *working_size*
    px (None: a record from before the size was kept) after choosing *chosen_size* px (None: no choice)."""
    import numpy as np

    from utils.classes import CLASSES
    from utils.detection.model import load_model_file, save_model_file

    model, meta = load_model_file(model_file)
    record = {"chosen_on": "validation", "score_threshold": score_threshold, "floor": 0.05, "iou_threshold": 0.5,
              "classes": list(CLASSES), "images": simulated_labelled_images(np.random.default_rng(0), images)}
    if working_size is not None:
        record["working_size"] = working_size
    if chosen_size is not None:
        meta = {**meta, "inference_size": {"image_size": chosen_size, "chosen_on": "validation", "tta": False}}
    return save_model_file(path, model, {**meta, "quantification": record})


def write_exif_turned_pair(images, annotations, orientation: int = 6, stem: str = "turned"):
    """A 160x90 photo stored with EXIF *orientation* (6: shown turned 90 degrees clockwise, 90x160) whose red
    face fills (100, 10, 150, 40) of the stored pixels, and the XML an EXIF-ignoring tool (LabelImg) writes for
    it: the stored size and that box. Returns (image path, XML path)."""
    from PIL import Image, ImageDraw

    from utils.data.voc import VocAnnotation, VocObject, write_voc

    stored = Image.new("RGB", (160, 90), (255, 255, 255))
    ImageDraw.Draw(stored).rectangle((100, 10, 149, 39), fill=(255, 0, 0))  # the face: 50x30 px, red
    exif = Image.Exif()
    exif[0x0112] = orientation
    Path(images).mkdir(parents=True, exist_ok=True)
    Path(annotations).mkdir(parents=True, exist_ok=True)
    image, xml = Path(images) / f"{stem}.jpg", Path(annotations) / f"{stem}.xml"
    stored.save(image, exif=exif, quality=95)
    write_voc(xml, VocAnnotation(image.name, 160, 90, objects=[VocObject("with_mask", 100, 10, 150, 40)]))
    return image, xml


def photo_folders(sample_dir, folder, layout=("siteA/a.jpg", "siteA/b.jpg", "siteB/cam1/c.jpg", "siteB/d.jpg")):
    """Copies of the sample images at *layout*'s paths below *folder* (photos in site folders, one nested): the
    predict tests' input; returns *folder*."""
    images = sorted((sample_dir / "images").glob("*.jpg"))
    for name, image in zip(layout, images, strict=False):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(image.read_bytes())
    return folder


def predict_quick(root, model, images, out, *extra):
    """Run bin/predict.py in-process on *images* with *model* into *out* (threshold 0.05, CPU, no loader workers)
    and *extra* flags; return the exit code."""
    return run_script(root, "predict", ["--images", *map(str, images), "--model", str(model), "--output-dir", str(out),
                                        "--score-threshold", "0.05", "--device", "cpu", "--workers", "0",
                                        *map(str, extra)])


# The train tests' settings: a run on tiny_dir (tests/conftest.py) in seconds on two CPU cores.
TINY = dict(image_size=128, batch_size=2, workers=0, epochs=2, warmup_iters=2, trainable_layers=2, seed=3)


def tiny_pairs(tiny_dir):
    """The image-annotation pairs of *tiny_dir*'s images/ and annotations/."""
    from utils.data.pairs import pair_folders

    return pair_folders(tiny_dir / "images", tiny_dir / "annotations").pairs


def generate(run_dir: Path, data: Path, *extra: str) -> int:
    """Run workflow.py --generate-only in-process on *data* into *run_dir* with *extra* flags; return the exit code."""
    import workflow as generator

    args = generator.get_args_parser().parse_args(
        ["--data", str(data), "--run-dir", str(run_dir), "--generate-only", *extra])
    return generator.main(args)


def load(run_dir: Path, name: str) -> dict:
    """The YAML file *name* of a generated run folder."""
    import yaml

    return yaml.safe_load((run_dir / name).read_text())


def jobs_by_id(run_dir: Path) -> dict[str, dict]:
    """The jobs of a generated run folder's workflow.yml by their id."""
    return {job["id"]: job for job in load(run_dir, "workflow.yml")["jobs"]}


def stop_after_records(monkeypatch, images: int, stop) -> list:
    """Make prediction's progress file call *stop* after *images* records; returns the images the model read."""
    from utils.detection import prediction_progress

    read, add = [], prediction_progress.PredictionProgress.add

    def counting_add(self, record):
        add(self, record)
        read.append(record["file"])
        if len(read) == images:
            stop()

    monkeypatch.setattr(prediction_progress.PredictionProgress, "add", counting_add)
    return read
