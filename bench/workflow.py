#!/usr/bin/env python3
"""Benchmarks of the workflow machinery (not of the models).

1. Local executor overhead: a DAG with the real workflow's shape whose jobs only sleep,
   run by utils/pegasus/executor.py. Reported as workflow wall time / critical-path job time
   (goal <= 1.05): what the executor adds on top of the longest chain of jobs.
   --statistics RUN_DIR/statistics.json adds the same ratio for a real run.
2. Generator: time and peak memory of workflow.py's generator (all catalogs, the DAG and
   the files written) for 1,000, 10,000 and 100,000 images (empty placeholder files:
   validation is not part of this measurement), each in a fresh process, and how they
   grow per 10x images.

    .venv/bin/python bench/workflow.py [--sizes 1000 10000 100000] [--sleep 2.0] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SLEEP_JOB = textwrap.dedent("""
    import sys, time
    seconds, outputs = float(sys.argv[1]), sys.argv[2:]
    time.sleep(seconds)
    for name in outputs:
        open(name, "w").write(name)
""")


def executor_overhead(sleep: float, jobs: int, hpo_jobs: int) -> dict:
    """Run a sleep-job copy of the workflow's DAG; return the executor's statistics."""
    from Pegasus.api import File, Job, Properties, ReplicaCatalog, Transformation, TransformationCatalog, Workflow

    from utils.pegasus.executor import run_workflow

    with tempfile.TemporaryDirectory(prefix="bench-executor.") as tmp:
        tmp = Path(tmp)
        run_dir = tmp / "run"
        run_dir.mkdir()
        script = tmp / "sleep_job.py"
        script.write_text(SLEEP_JOB)
        data = tmp / "data.txt"
        data.write_text("data")
        tc = TransformationCatalog().add_transformations(
            Transformation("sleep", site="local", pfn=script, is_stageable=True))
        rc = ReplicaCatalog().add_replica("local", "data.txt", data.as_uri())
        wf = Workflow("bench")
        # (job id, relative duration, inputs, outputs): the mask-detection DAG's shape
        shape = [("plot", 0.5, ["data.txt"], ["plot.png"]),
                 ("preprocess_val", 0.5, ["data.txt"], ["val.tar"]),
                 ("preprocess_test", 0.5, ["data.txt"], ["test.tar"]),
                 ("augment", 1.0, ["data.txt"], ["train.tar"])]
        shape += [(f"hpo_{i}", 2.0, ["train.tar", "val.tar"], [f"best_{i}.json"]) for i in range(hpo_jobs)]
        shape += [("hpo_merge", 0.25, [f"best_{i}.json" for i in range(hpo_jobs)], ["best.json"]),
                  ("train", 2.0, ["train.tar", "val.tar", "best.json"], ["model.pt"]),
                  ("evaluate", 0.5, ["test.tar", "model.pt"], ["evaluation.json"]),
                  ("predict", 0.5, ["model.pt"], ["predictions.json"])]
        for job_id, weight, inputs, outputs in shape:
            job = Job("sleep", _id=job_id).add_args(f"{sleep * weight:.3f}", *outputs)
            job.add_inputs(*inputs).add_outputs(*(File(o) for o in outputs), stage_out=job_id in ("evaluate", "predict"))
            wf.add_jobs(job)
        tc.write(str(run_dir / "transformations.yml"))
        rc.write(str(run_dir / "replicas.yml"))
        wf.write(str(run_dir / "workflow.yml"))
        props = Properties()
        props["dagman.retry"] = 0
        props.write(str(run_dir / "pegasus.properties"))
        with open(os.devnull, "w") as quiet:
            status = run_workflow(run_dir, jobs=jobs, out=quiet)
        if status != 0:
            raise SystemExit(f"sleep-job workflow failed (status {status}); see {run_dir}")
        return json.loads((run_dir / "statistics.json").read_text())


GENERATOR_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import workflow as generator
    from utils.pegasus.config import PredShard, SplitEntry, WorkflowConfig, load_sites_config
    data, run_dir = Path(sys.argv[2]), Path(sys.argv[3])
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    began = time.perf_counter()
    images = sorted((data / "images").iterdir())
    entries = []
    for index, image in enumerate(images):
        split = "train" if index % 10 < 7 else ("val" if index % 10 == 7 else "test")
        entries.append(SplitEntry(image, data / "annotations" / (image.stem + ".xml"), split))
    split_csv = run_dir / "split.csv"
    run_dir.mkdir(parents=True, exist_ok=True)
    split_csv.write_text("image,annotation,split\\n" + "".join(f"{e.image},{e.annotation},{e.split}\\n" for e in entries))
    config = WorkflowConfig(
        run_dir=run_dir, split_csv=split_csv, entries=entries,
        pred_shards=[PredShard(data / f"shard-{i:06d}.tar", 1000) for i in range(max(1, len(images) // 5000))],
        sites_config=load_sites_config(Path(sys.argv[1]) / "sites.yml"),
        project_root=Path(sys.argv[1]), properties_file=Path(sys.argv[1]) / "properties.conf",
        hpo_jobs=2, trials=2)
    built = generator.MaskDetectionWorkflow(config).build()
    build_s = time.perf_counter() - began
    built.write()
    total_s = time.perf_counter() - began
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"images": len(images), "jobs": len(built.wf.jobs), "replicas": len(built.rc.entries),
                      "build_s": build_s, "total_s": total_s, "baseline_mb": baseline_kb / 1024,
                      "peak_mb": peak_kb / 1024,
                      "workflow_mb": (run_dir / "workflow.yml").stat().st_size / 2**20,
                      "replicas_mb": (run_dir / "replicas.yml").stat().st_size / 2**20}))
""")


def generator_scaling(size: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-generator-{size}.") as tmp:
        tmp = Path(tmp)
        (tmp / "data" / "images").mkdir(parents=True)
        (tmp / "data" / "annotations").mkdir()
        for index in range(size):  # placeholders: the generator never opens them
            (tmp / "data" / "images" / f"img_{index:06d}.jpg").touch()
            (tmp / "data" / "annotations" / f"img_{index:06d}.xml").touch()
        child = subprocess.run([sys.executable, "-c", GENERATOR_CHILD, str(ROOT), str(tmp / "data"), str(tmp / "run")],
                               capture_output=True, text=True, check=False)
        if child.returncode != 0:
            raise SystemExit(f"generator failed for {size} images:\n{child.stderr[-2000:]}")
        return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000], help="image counts")
    parser.add_argument("--sleep", type=float, default=2.0, help="seconds of the unit sleep job")
    parser.add_argument("--jobs", type=int, default=2, help="executor slots")
    parser.add_argument("--hpo-jobs", type=int, default=2, help="parallel HPO jobs in the sleep DAG")
    parser.add_argument("--statistics", type=Path, nargs="*", default=[],
                        help="statistics.json of real runs to report the same ratio for")
    parser.add_argument("--skip-executor", action="store_true", help="only the generator benchmark")
    parser.add_argument("--skip-generator", action="store_true", help="only the executor benchmark")
    args = parser.parse_args()

    if not args.skip_executor:
        stats = executor_overhead(args.sleep, args.jobs, args.hpo_jobs)
        cp = stats["critical_path"]
        print(f"Local executor overhead ({len(stats['jobs'])} sleep jobs, unit {args.sleep:g} s, {args.jobs} slots)")
        print(f"  {'run':<34}{'wall s':>9}{'critical path s':>17}{'ratio':>8}")
        print(f"  {'sleep-job DAG':<34}{stats['wall_time_s']:>9.2f}{cp['job_time_s']:>17.2f}"
              f"{cp['wall_over_critical_path']:>8.3f}   (goal <= 1.05)")
        print(f"  critical path: {' -> '.join(cp['jobs'])}")
        for path in args.statistics:
            real = json.loads(path.read_text())
            rcp = real["critical_path"]
            print(f"  {str(path.parent.name)[:34]:<34}{real['wall_time_s']:>9.2f}{rcp['job_time_s']:>17.2f}"
                  f"{rcp['wall_over_critical_path']:>8.3f}")
        print()

    if not args.skip_generator:
        print("Generator (workflow.py, placeholders, no validation; each size in a fresh process)")
        print(f"  {'images':>8}{'jobs':>6}{'replicas':>10}{'build s':>9}{'total s':>9}{'us/image':>10}"
              f"{'peak RSS MB':>13}{'over base':>11}{'workflow.yml MB':>17}{'time x':>8}{'mem x':>7}")
        previous = None
        for size in args.sizes:
            row = generator_scaling(size)
            extra = row["peak_mb"] - row["baseline_mb"]
            growth_t = f"{row['total_s'] / previous['total_s']:.1f}" if previous else "-"
            growth_m = (f"{extra / (previous['peak_mb'] - previous['baseline_mb']):.1f}"
                        if previous and previous["peak_mb"] > previous["baseline_mb"] else "-")
            print(f"  {row['images']:>8}{row['jobs']:>6}{row['replicas']:>10}{row['build_s']:>9.2f}"
                  f"{row['total_s']:>9.2f}{row['total_s'] / row['images'] * 1e6:>10.0f}{row['peak_mb']:>13.0f}"
                  f"{extra:>11.0f}{row['workflow_mb']:>17.1f}{growth_t:>8}{growth_m:>7}", flush=True)
            previous = row
        print("  time x / mem x: growth from the previous size (10x images -> ~10x means linear)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
