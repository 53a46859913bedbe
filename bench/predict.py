#!/usr/bin/env python3
"""Prediction throughput: the predict job's whole path against pure model inference, in images/s.

Both measured in one run, on the same real images:
  pure        the model alone on images already decoded and held as float tensors on the
              device, in batches of --batch-size (what the hardware can do)
  end-to-end  utils.detection.prediction.predict_images, i.e. the predict job without argument parsing:
              listing files, decoding in DataLoader workers, batching, inference, score
              filtering, drawing and JPEG-encoding annotated images (thread pool), and
              writing predictions.json/.csv and compliance.json
The ratio end-to-end / pure is the share of the model's speed the job keeps (goal >= 0.9).
After a warm-up batch the two paths are timed alternately --repeats times and the fastest
run of each counts, so that a burst of load from other processes on a shared machine
hits both alike. As a cross-check that does not depend on such load, the share of the
end-to-end wall time spent inside the model call is also reported (1 - that share is
the pipeline's own overhead: decoding not hidden by the workers, drawing, writing), and
the ratio of CPU seconds per image (this process's threads plus its decode workers):
on a machine shared with other work, CPU time is far less disturbed than wall time.

The model is --model FILE when given (a trained model: realistic box counts), else a
freshly built mobilenet_v2_fpn (ImageNet backbone when cached) at --image-size. Outputs go
to a temporary folder. Skips with a message (exit 0) when the data folder is absent.

--synthetic-12mp N measures instead, in one run, the predict job's path on N synthetic 12 MP JPEG
photos (4000x3000, made in a temporary folder) decoded whole, as predict did before 2026-12-06
("whole": the decode workers' bound off, annotated copies at full size), against decoded at most at
the size the model uses them at ("bounded": utils.detection.inference.decode_bound, copies to draw at
most ANNOTATED_MAX_SIDE): images/s, CPU s per image and the peak memory of the job's processes (the
sum of the proportional set sizes, PSS, of the process and its decode workers, sampled every 20 ms:
shared memory, where the workers hand decoded images over, counted once). Each path runs in a
process of its own (spawned), --repeats times alternately; the fastest run and the lowest peak count.
"""

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "face-mask"


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help=f"folder with images/ (default: {DEFAULT_DATA})")
    parser.add_argument("--limit", type=int, default=24, help="use the first N images (default: 24)")
    parser.add_argument("--model", type=Path, default=None,
                        help="model file from bin/train.py (default: build an untrained mobilenet_v2_fpn)")
    parser.add_argument("--image-size", type=int, default=512,
                        help="model input size when building a model (default: 512)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per model call (default: 4)")
    parser.add_argument("--workers", type=int, default=-1,
                        help="decoding processes for the end-to-end path; -1 = the predict job's default "
                             "(default: -1)")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="as in bin/predict.py (default: 0.5)")
    parser.add_argument("--tta", action="store_true", help="time flip TTA on both paths")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per path, alternating; the fastest counts (default: 3)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="(default: auto)")
    parser.add_argument("--output", type=Path, default=None, help="also write the figures as JSON here")
    parser.add_argument("--synthetic-12mp", type=int, default=None, metavar="N",
                        help="measure whole against bounded decoding on N synthetic 12 MP JPEG photos instead")
    parser.add_argument("--annotate", action="store_true",
                        help="with --synthetic-12mp: draw every photo's annotated copy too (default: none drawn)")
    return parser


def cpu_seconds() -> float:
    """CPU time of this process's threads and of its finished children (DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def seconds(function):
    """(wall seconds, CPU seconds) of one call."""
    started, cpu_started = time.perf_counter(), cpu_seconds()
    function()
    return time.perf_counter() - started, cpu_seconds() - cpu_started


def synthetic_photos(folder: Path, count: int, size=(4000, 3000)) -> list[Path]:
    """*count* JPEGs of *size* with a phone photo's mix of smooth areas and detail (a low-resolution random
    picture enlarged, with noise): about 3 MB each at quality 90."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        base = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        pixels = np.asarray(base, dtype=np.int16) + rng.integers(-12, 13, (size[1], size[0], 3), dtype=np.int16)
        paths.append(folder / f"photo_{index:03d}.jpg")
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(paths[-1], quality=90)
    return paths


def tree_pss_mb(pid: int) -> float:
    """The summed PSS of *pid* and its descendants, in MB (Linux /proc); 0 for a process gone."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/smaps_rollup") as handle:
                total += next(int(line.split()[1]) for line in handle if line.startswith("Pss:"))
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    stack += [int(child) for child in handle.read().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return total / 1024


def one_path(whole: bool, files, args, results) -> None:
    """Run the predict job's path on *files* in this (spawned) process; put (seconds, CPU seconds, PSS in MB with
    the model built, before the run) in *results*."""
    import torch

    from utils import defaults as D
    import utils.detection.inference as inference
    from utils.detection.model import build_model
    from utils.detection.prediction import predict_images

    if whole:  # as before 2026-12-06: every photo decoded whole, drawn at its own size
        inference.decode_bound = lambda model: None
        D.ANNOTATED_MAX_SIDE = 1 << 30
    torch.manual_seed(0)
    model = build_model("mobilenet_v2_fpn", weights="imagenet", image_size=args.image_size).eval()
    workers = inference.default_num_workers() if args.workers < 0 else args.workers
    resting = tree_pss_mb(os.getpid())
    with tempfile.TemporaryDirectory(prefix="bench_predict.") as tmp:
        run_s, run_cpu = seconds(lambda: predict_images(
            model, files, Path(tmp) / "out", score_threshold=args.score_threshold, batch_size=args.batch_size,
            num_workers=workers, annotate=args.annotate))
    results.put((run_s, run_cpu, resting))


def synthetic_main(args) -> int:
    import multiprocessing

    from utils.detection.inference import default_num_workers

    context = multiprocessing.get_context("spawn")
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_photos.") as folder:
        files = synthetic_photos(Path(folder), args.synthetic_12mp)
        megabytes = sum(path.stat().st_size for path in files) / len(files) / 1e6
        for _ in range(args.repeats):
            for name in ("whole", "bounded"):
                results = context.Queue()
                process = context.Process(target=one_path, args=(name == "whole", files, args, results))
                process.start()
                peak = 0.0
                while process.is_alive():
                    peak = max(peak, tree_pss_mb(process.pid))
                    time.sleep(0.02)
                process.join()
                run_s, run_cpu, resting = results.get(timeout=10)
                entry = best.setdefault(name, {"images_per_s": 0.0, "cpu_s_per_image": float("inf"),
                                               "peak_pss_mb": float("inf"), "pss_before_run_mb": round(resting, 1)})
                n = len(files)
                entry["images_per_s"] = max(entry["images_per_s"], round(n / run_s, 3))
                entry["cpu_s_per_image"] = min(entry["cpu_s_per_image"], round(run_cpu / n, 3))
                entry["peak_pss_mb"] = min(entry["peak_pss_mb"], round(peak, 1))
    workers = default_num_workers() if args.workers < 0 else args.workers
    figures = {
        "photos": args.synthetic_12mp, "photo_size": "4000x3000 JPEG, quality 90",
        "mean_file_mb": round(megabytes, 2), "model": f"untrained mobilenet_v2_fpn, image size {args.image_size}",
        "batch_size": args.batch_size, "decode_workers": workers, "annotated": args.annotate,
        "repeats": args.repeats, "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None, **best,
        "peak_ratio": round(best["whole"]["peak_pss_mb"] / best["bounded"]["peak_pss_mb"], 2),
        "speed_ratio": round(best["bounded"]["images_per_s"] / best["whole"]["images_per_s"], 3),
    }
    print(f"bench/predict --synthetic-12mp: {figures['photos']} photos 4000x3000 ({megabytes:.1f} MB each), "
          f"{figures['model']}, batch {args.batch_size}, {workers} decode workers, annotated={args.annotate}")
    for name in ("whole", "bounded"):
        entry = best[name]
        print(f"  {name:8s}: {entry['images_per_s']:7.3f} images/s, {entry['cpu_s_per_image']:6.2f} CPU s/image, "
              f"peak PSS {entry['peak_pss_mb']:8.1f} MB ({entry['pss_before_run_mb']:.0f} MB with the model "
              "built, before the run)")
    if args.output:
        from utils.atomic import write_json
        write_json(args.output, figures)
    return 0


def main(args) -> int:
    if args.synthetic_12mp:
        return synthetic_main(args)
    import torch

    from utils.detection.device import resolve_device
    from utils.data.images import is_image_name, load_rgb
    import utils.detection.inference as inference
    from utils.detection.inference import default_num_workers, detect, to_model_input
    from utils.detection.model import build_model, load_model_file
    from utils.detection.prediction import predict_images
    from torchvision.transforms.v2 import functional as F

    images_dir = args.data / "images"
    if not images_dir.is_dir():
        print(f"bench/predict: skipped: {images_dir} does not exist")
        return 0
    files = sorted(p for p in images_dir.iterdir() if p.is_file() and is_image_name(p))[: args.limit]
    if not files:
        print(f"bench/predict: skipped: no images in {images_dir}")
        return 0
    device = resolve_device(args.device)
    if args.model:
        model, meta = load_model_file(args.model, device)
        model_desc = f"{args.model} ({meta.get('backbone')}, image size {meta.get('image_size')})"
    else:
        model = build_model("mobilenet_v2_fpn", weights="imagenet", image_size=args.image_size).to(device).eval()
        model_desc = (f"untrained mobilenet_v2_fpn, image size {args.image_size} "
                      f"({model.weights_report.loaded} backbone weights)")
    workers = default_num_workers() if args.workers < 0 else args.workers
    batches = [files[i:i + args.batch_size] for i in range(0, len(files), args.batch_size)]

    # Pure inference: decoded once, held as float tensors on the device.
    tensors = [[to_model_input(F.pil_to_tensor(load_rgb(p)), device) for p in batch] for batch in batches]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def pure():
        for batch in tensors:
            detect(model, batch, tta=args.tta, score_threshold=args.score_threshold)
        sync()

    in_model = [0.0]

    def timed_detect(*a, **k):  # the model call inside the job, timed (CUDA synchronised)
        started = time.perf_counter()
        result = detect(*a, **k)
        sync()
        in_model[0] += time.perf_counter() - started
        return result

    with tempfile.TemporaryDirectory(prefix="bench_predict.") as tmp:
        def end_to_end():
            predict_images(model, files, Path(tmp) / "out", device=device, score_threshold=args.score_threshold,
                           tta=args.tta, batch_size=args.batch_size, num_workers=workers)
            sync()

        detect(model, tensors[0], tta=args.tta)  # warm-up: allocator, kernels, thread pools
        pure_s = e2e_s = pure_cpu = e2e_cpu = float("inf")
        model_share = None
        inference.detect = timed_detect
        try:
            for _ in range(args.repeats):
                run_s, run_cpu = seconds(pure)
                pure_s, pure_cpu = min(pure_s, run_s), min(pure_cpu, run_cpu)
                in_model[0] = 0.0
                run_s, run_cpu = seconds(end_to_end)
                e2e_cpu = min(e2e_cpu, run_cpu)
                if run_s < e2e_s:
                    e2e_s, model_share = run_s, in_model[0] / run_s
        finally:
            inference.detect = detect
        detections = json.loads((Path(tmp) / "out" / "predictions.json").read_text())["num_detections"]

    n = len(files)
    pure_ips, e2e_ips = n / pure_s, n / e2e_s
    ratio = e2e_ips / pure_ips
    cpu_ratio = pure_cpu / e2e_cpu
    figures = {
        "images": n, "model": model_desc, "device": str(device), "batch_size": args.batch_size,
        "decode_workers": workers, "torch_threads": torch.get_num_threads(), "tta": args.tta,
        "score_threshold": args.score_threshold, "detections_written": detections,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "pure_images_per_s": round(pure_ips, 3), "end_to_end_images_per_s": round(e2e_ips, 3),
        "ratio": round(ratio, 3), "model_share_of_end_to_end": round(model_share, 3),
        "pure_cpu_s_per_image": round(pure_cpu / n, 3), "end_to_end_cpu_s_per_image": round(e2e_cpu / n, 3),
        "cpu_ratio": round(cpu_ratio, 3), "repeats": args.repeats,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    print(f"bench/predict: {n} images from {images_dir}, {model_desc}, device {device}, batch {args.batch_size}, "
          f"{workers} decode workers, {torch.get_num_threads()} torch threads, tta={args.tta}")
    print(f"  pure inference (tensors held in memory): {pure_ips:8.2f} images/s")
    print(f"  end-to-end predict job path            : {e2e_ips:8.2f} images/s  ({detections} detections written)")
    print(f"  ratio end-to-end / pure                : {ratio:8.3f}  (goal >= 0.9)")
    print(f"  share of end-to-end time in the model  : {model_share:8.3f}  (pipeline overhead "
          f"{1 - model_share:.1%})")
    print(f"  CPU s per image, pure / end-to-end     : {cpu_ratio:8.3f}  ({pure_cpu / n:.2f} s vs {e2e_cpu / n:.2f} s; "
          f"less disturbed by other load than wall time)")
    if hasattr(os, "getloadavg"):
        print(f"  load average during the run            : {os.getloadavg()[0]:8.2f}  on {figures['cpus']} CPUs")
    if args.output:
        from utils.atomic import write_json
        write_json(args.output, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
