#!/usr/bin/env python3
"""How far a reader must jump to follow bin/train.py:main (issue #22: at most 5 climbs and 30 returns).

Runs one tiny training (synthetic sample data, CPU, two epochs, held-out validation images) under
sys.settrace and reads the project functions it calls in the order they are first called, as a
depth-first read of the code from main would meet them. A *stop* is a move to another file; a
*return* a move to a file already left earlier; a *climb* a move up a layer (bin > utils/{pegasus,
service,reporting} > utils/detection > utils/data > utils), from the file last read to the next
function, e.g. from utils/atomic.py, having read write_text, back up to the next function of
utils/detection/training_run.py. Read so, 414ebed (the code issue #22 measured: 75 stops, 60 returns,
14 climbs) gives 67 stops, 50 returns and 14 climbs. Also counted: calls against the import direction
(the callee's module imports the caller's: a callback, as engine.py made into training.py before 9ed39a9).
What an import runs (a class body, a module's own call) is not read, also where main imports lazily.
--max-depth limits the read to the calls within that many project frames of main (main's own calls
are depth 1). Prints one line; --list prints the read. Exit 0, 2 on a bad flag.
"""

import argparse
import ast
import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIPPED_FRAMES = {"<module>", "<genexpr>", "<listcomp>", "<dictcomp>", "<setcomp>"}


def layer(path: str) -> int:
    """Higher layers import lower ones: bin > utils/{pegasus,service,reporting} > detection > data > utils."""
    if path.startswith("bin/"):
        return 4
    if path.startswith(("utils/pegasus/", "utils/service/", "utils/reporting/")):
        return 3
    if path.startswith("utils/detection/"):
        return 2
    return 1 if path.startswith("utils/data/") else 0


def project_path(filename: str) -> str | None:
    if not os.path.isabs(filename):
        return None
    path = Path(filename).resolve()
    if ROOT not in path.parents or ".venv" in path.parts or "site-packages" in path.parts:
        return None
    return str(path.relative_to(ROOT))


def imported_files(path: str) -> set[str]:
    """Project files *path* imports directly."""
    package = str(Path(path).parent).replace("/", ".")
    found = set()
    for node in ast.walk(ast.parse((ROOT / path).read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            for candidate in (name.replace(".", "/") + ".py", name.replace(".", "/") + "/__init__.py"):
                if (ROOT / candidate).is_file():
                    found.add(candidate)
    return found


def import_closure(path: str, cache: dict) -> set[str]:
    if path not in cache:
        cache[path] = set()  # an import cycle ends here
        reached = set()
        for imported in imported_files(path):
            reached |= {imported} | import_closure(imported, cache)
        cache[path] = reached
    return cache[path]


def trace_main(train_flags: list[str], max_depth: int) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """(caller, callee) as (file, function), each callee once, in the order first called."""
    spec = importlib.util.spec_from_file_location("train_job", ROOT / "bin" / "train.py")
    train_job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_job)
    args = train_job.get_args_parser().parse_args(train_flags)
    calls, seen = [], set()

    def tracer(frame, event, _arg):
        if event != "call" or frame.f_code.co_name in SKIPPED_FRAMES:
            return None
        callee = project_path(frame.f_code.co_filename)
        if callee is None or (callee, frame.f_code.co_name) in seen:
            return None
        caller, depth, below = None, 0, frame.f_back
        while below is not None:
            if below.f_code.co_name == "<module>":
                return None  # run by an import (a class body, a module's own call): main imports lazily, no read
            path = project_path(below.f_code.co_filename)
            if path is not None and below.f_code.co_name not in SKIPPED_FRAMES:
                caller = caller or (path, below.f_code.co_name)
                depth += 1
                if path == "bin/train.py" and below.f_code.co_name == "main":
                    break
            below = below.f_back
        else:
            return None  # not called from main
        if depth <= max_depth:
            seen.add((callee, frame.f_code.co_name))
            calls.append((caller, (callee, frame.f_code.co_name)))
        return None

    sys.settrace(tracer)
    threading.settrace(tracer)
    try:
        train_job.main(args)
    finally:
        sys.settrace(None)
        threading.settrace(None)
    return calls


def main() -> int:
    global ROOT  # --root: every path above is read relative to the checkout followed
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-depth", type=int, default=1000,
                   help="project frames below main a call may be (default: 1000, every call)")
    p.add_argument("--list", action="store_true", help="print the read, one function a line (default: off)")
    p.add_argument("--root", type=Path, default=ROOT,
                   help="the checkout whose bin/train.py is followed, e.g. a worktree of an older commit "
                        "(default: this one)")
    args = p.parse_args()
    if args.max_depth < 1:
        p.error(f"--max-depth must be at least 1, got {args.max_depth}")
    if not (args.root / "bin" / "train.py").is_file():
        p.error(f"--root {args.root}: holds no bin/train.py")
    ROOT = args.root.resolve()
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))  # the followed checkout's utils, not this one's
    from utils.data.sample_data import make_sample_dataset

    with tempfile.TemporaryDirectory() as folder:
        data, out = Path(folder) / "data", Path(folder) / "run"
        make_sample_dataset(data, num_images=12, seed=1, image_size=(96, 96))
        images, annotations = str(data / "images"), str(data / "annotations")
        calls = trace_main(["--images", images, "--annotations", annotations, "--val-images", images,
                            "--val-annotations", annotations, "--image-size", "64", "--batch-size", "2",
                            "--workers", "0", "--weights", "none", "--epochs", "2", "--no-progress", "--device",
                            "cpu", "--checkpoint", str(out / "checkpoint.pt"), "--output", str(out / "model.pt")],
                           args.max_depth)
    closure, left, current, stops, returns, climbs, against = {}, set(), "bin/train.py", 0, 0, 0, 0
    for (caller_file, caller), (callee_file, callee) in calls:
        backwards = callee_file != caller_file and (layer(callee_file) > layer(caller_file)
                                                    or caller_file in import_closure(callee_file, closure))
        moved = callee_file != current
        back, climb = moved and callee_file in left, moved and layer(callee_file) > layer(current)
        if moved:
            left.add(current)
            current = callee_file
        stops, returns, climbs, against = stops + moved, returns + back, climbs + climb, against + backwards
        if args.list:
            print(f"{caller_file}:{caller} -> {callee_file}:{callee}{'  RETURN' if back else ''}"
                  f"{'  CLIMB' if climb else ''}{'  AGAINST-IMPORTS' if backwards else ''}", file=sys.stderr)
    print(f"follow_args: max depth {args.max_depth}: {len(calls)} functions, {stops} stops, {returns} returns, "
          f"{climbs} climbs ({against} calls against the import direction)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
