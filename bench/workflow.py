#!/usr/bin/env python3
"""Benchmarks of the workflow machinery (not of the models).

1. Local executor overhead: a DAG with the real workflow's shape whose jobs only sleep,
   run by the local executor (utils/executor/). Reported as workflow wall time / critical-path job time
   (goal <= 1.05): what the executor adds on top of the longest chain of jobs.
   --statistics RUN_DIR/statistics.json adds the same ratio for a real run.
2. Generator: time, peak memory and workflow.yml size of workflow.py's generator (all
   catalogs, the DAG and the files written) for 1k, 10k, 100k and 1M images, sharded as a
   large run is (data splits and the prediction set in shards of 1,000; placeholder names:
   validation and packing are not part of this measurement), each in a fresh process.
3. The real Pegasus planner on those workflows at 10k and 100k images (plan-check.sh).
4. With --fanout-model: a prediction over the sample as one predict job and as N (one per
   shard), each merged by merge_predictions, through the local executor: wall time, wall /
   critical path and the merged compliance of both.

    .venv/bin/python bench/workflow.py [--sizes 1000 10000 100000 1000000] [--plan-sizes 10000 100000]
        [--output bench/results/workflow.json]
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


def write_and_run(run_dir: Path, tc, rc, wf, jobs: int) -> int:
    """Write the catalogs and the workflow (no retries) into *run_dir* and run them with the local executor."""
    from Pegasus.api import Properties

    from utils.executor import run_workflow

    tc.write(str(run_dir / "transformations.yml"))
    rc.write(str(run_dir / "replicas.yml"))
    wf.write(str(run_dir / "workflow.yml"))
    props = Properties()
    props["dagman.retry"] = 0
    props.write(str(run_dir / "pegasus.properties"))
    with open(os.devnull, "w") as quiet:
        return run_workflow(run_dir, jobs=jobs, out=quiet)


def executor_overhead(sleep: float, jobs: int, hpo_jobs: int) -> dict:
    """Run a sleep-job copy of the workflow's DAG; return the executor's statistics."""
    from Pegasus.api import File, Job, ReplicaCatalog, Transformation, TransformationCatalog, Workflow

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
            job.add_inputs(*inputs).add_outputs(*(File(o) for o in outputs),
                                                stage_out=job_id in ("evaluate", "predict"))
            wf.add_jobs(job)
        status = write_and_run(run_dir, tc, rc, wf, jobs)
        if status != 0:
            raise SystemExit(f"sleep-job workflow failed (status {status}); see {run_dir}")
        return json.loads((run_dir / "statistics.json").read_text())


def fanout_prediction(model: Path, images_dir: Path, shards: int, jobs: int) -> dict:
    """One predict job over all images against one per shard (the workflow's fan-out), each followed by
    merge_predictions, run by the local executor with *jobs* slots; returns the statistics of both."""
    from Pegasus.api import File, Job, ReplicaCatalog, Transformation, TransformationCatalog, Workflow

    from utils.data.shards import collect_images, write_shards

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-fanout.") as tmp:
        tmp = Path(tmp)
        items, _ = collect_images(images_dir)
        index = write_shards(items, tmp / "shards", -(-len(items) // shards))
        for layout, groups in (("1 job", [index.paths()]), (f"{len(index.shards)} jobs", [[p] for p in index.paths()])):
            run_dir = tmp / layout.replace(" ", "_")
            run_dir.mkdir()
            tc = TransformationCatalog()
            for kind in ("predict", "merge_predictions"):
                tc.add_transformations(Transformation(kind, site="local", pfn=ROOT / "bin" / f"{kind}.py",
                                                      is_stageable=True))
            rc = ReplicaCatalog().add_replica("local", "model.pt", model.resolve().as_uri())
            wf, parts = Workflow("fanout"), []
            for number, group in enumerate(groups):
                inputs = [File(f"pred_{path.name}") for path in group]
                for path, lfn in zip(group, inputs):
                    rc.add_replica("local", lfn, path.as_uri())
                part = File(f"predictions_part{number}.json")
                job = Job("predict", _id=f"predict_{number}").add_args(
                    "--images", *inputs, "--model", "model.pt", "--output-dir", ".", "--output-tag", f"part{number}",
                    "--no-annotated", "--device", "cpu")
                job.add_inputs(File("model.pt"), *inputs).add_outputs(part, stage_out=False)
                wf.add_jobs(job)
                parts.append(part)
            merge = Job("merge_predictions", _id="merge").add_args("--inputs-dir", ".", "--expected", len(parts),
                                                                    "--output-dir", ".")
            merge.add_inputs(*parts).add_outputs(File("compliance.json"), stage_out=True)
            wf.add_jobs(merge)
            if write_and_run(run_dir, tc, rc, wf, jobs) != 0:
                    raise SystemExit(f"fan-out benchmark ({layout}) failed; see {run_dir}/logs")
            stats = json.loads((run_dir / "statistics.json").read_text())
            overall = json.loads((run_dir / "outputs" / "compliance.json").read_text())["overall"]
            results[layout] = {"images": len(items), "stats": stats, "overall": overall}
    return results


GENERATOR_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import workflow as generator
    from utils.pegasus.config import ShardFile, SplitEntry, WorkflowConfig, load_sites_config
    size, per_shard, run_dir = int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    began = time.perf_counter()
    data = run_dir / "data"
    entries = []
    for index in range(size):  # placeholder names: the generator never opens an image or a shard
        split = "train" if index % 10 < 7 else ("val" if index % 10 == 7 else "test")
        entries.append(SplitEntry(data / "images" / f"img_{index:07d}.jpg",
                                  data / "annotations" / f"img_{index:07d}.xml", split))
    split_csv = run_dir / "split.csv"
    run_dir.mkdir(parents=True, exist_ok=True)
    split_csv.write_text("image,annotation,split\\n"
                         + "".join(f"{e.image},{e.annotation},{e.split}\\n" for e in entries))
    def shards(folder, count):
        return [ShardFile(folder / f"shard-{i:06d}.tar", min(per_shard, count - i * per_shard))
                for i in range(-(-count // per_shard))]
    counts = {split: sum(1 for e in entries if e.split == split) for split in ("train", "val", "test")}
    config = WorkflowConfig(
        run_dir=run_dir, split_csv=split_csv, entries=entries,
        pred_shards=shards(run_dir / "pred_shards", size),  # predict on the whole collection
        data_shards={split: shards(run_dir / "data_shards" / split, n) for split, n in counts.items()},
        sites_config=load_sites_config(Path(sys.argv[1]) / "sites.yml"),
        project_root=Path(sys.argv[1]), properties_file=Path(sys.argv[1]) / "properties.conf",
        hpo_jobs=2, trials=2)
    built = generator.MaskDetectionWorkflow(config).build()
    build_s = time.perf_counter() - began
    built.write(graph=False)
    total_s = time.perf_counter() - began
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"images": size, "per_shard": per_shard, "jobs": len(built.wf.jobs),
                      "replicas": len(built.rc.entries), "build_s": build_s, "total_s": total_s,
                      "baseline_mb": baseline_kb / 1024, "peak_mb": peak_kb / 1024,
                      "workflow_kb": (run_dir / "workflow.yml").stat().st_size / 1024,
                      "replicas_kb": (run_dir / "replicas.yml").stat().st_size / 1024}))
""")


def generator_scaling(size: int, per_shard: int, keep: Path | None = None) -> dict:
    """Generate a sharded workflow over *size* placeholder images in a fresh process; with *keep*, the
    run dir is left there (for the planner)."""
    with tempfile.TemporaryDirectory(prefix=f"bench-generator-{size}.") as tmp:
        run_dir = keep or Path(tmp) / "run"
        child = subprocess.run([sys.executable, "-c", GENERATOR_CHILD, str(ROOT), str(size), str(per_shard),
                                str(run_dir)], capture_output=True, text=True, check=False)
        if child.returncode != 0:
            raise SystemExit(f"generator failed for {size} images:\n{child.stderr[-2000:]}")
        return json.loads(child.stdout.strip().splitlines()[-1])


def planning_time(size: int, per_shard: int) -> dict:
    """The real Pegasus planner (../shared/pegasus/plan-check.sh, condor plan) on a generated
    sharded workflow of *size* images; None when the planner or Java is absent."""
    import re
    import shutil
    import time

    plan_check = ROOT.parent / "shared" / "pegasus" / "plan-check.sh"
    if not plan_check.is_file() or shutil.which("java") is None:
        return None
    with tempfile.TemporaryDirectory(prefix=f"bench-plan-{size}.") as tmp:
        run_dir = Path(tmp) / "run"
        row = generator_scaling(size, per_shard, keep=run_dir)
        began = time.perf_counter()
        child = subprocess.run(["bash", str(plan_check), str(run_dir), "--work", str(Path(tmp) / "work")],
                               capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - began
        if child.returncode != 0:
            raise SystemExit(f"planning failed for {size} images:\n{(child.stdout + child.stderr)[-2000:]}")
        jobs = re.search(r"(\d+) jobs", child.stdout)
        return {"images": size, "generated_jobs": row["jobs"], "planned_jobs": int(jobs.group(1)) if jobs else None,
                "plan_s": seconds, "line": next((line.strip() for line in child.stdout.splitlines()
                                                  if "plan OK" in line), child.stdout.strip().splitlines()[-1])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000, 1000000],
                        help="image counts of the generator benchmark")
    parser.add_argument("--per-shard", type=int, default=1000, help="images per shard (default: 1000)")
    parser.add_argument("--fanout-model", type=Path, default=None,
                        help="model.pt for the fanned-out prediction benchmark (e.g. runs/sample/outputs/model.pt "
                             "after make run; default: skip it)")
    parser.add_argument("--fanout-images", type=Path, default=ROOT / "data" / "sample" / "images",
                        help="images of the fanned-out prediction benchmark (default: the sample's)")
    parser.add_argument("--fanout-shards", type=int, default=4, help="predict jobs of the fan-out (default: 4)")
    parser.add_argument("--plan-sizes", type=int, nargs="*", default=[10000, 100000],
                        help="image counts to plan with the real planner (none: skip)")
    parser.add_argument("--sleep", type=float, default=2.0, help="seconds of the unit sleep job")
    parser.add_argument("--jobs", type=int, default=2, help="executor slots")
    parser.add_argument("--hpo-jobs", type=int, default=2, help="parallel HPO jobs in the sleep DAG")
    parser.add_argument("--statistics", type=Path, nargs="*", default=[],
                        help="statistics.json of real runs to report the same ratio for")
    parser.add_argument("--skip-executor", action="store_true", help="only the generator benchmark")
    parser.add_argument("--skip-generator", action="store_true", help="only the executor benchmark")
    parser.add_argument("--output", type=Path, default=None,
                        help="also write every figure as JSON here (atomically), e.g. bench/results/workflow.json")
    args = parser.parse_args()
    figures = {"cpus": os.cpu_count(), "settings": {key: str(value) if isinstance(value, Path) else value
                                                    for key, value in vars(args).items() if key != "output"}}

    if not args.skip_executor:
        stats = executor_overhead(args.sleep, args.jobs, args.hpo_jobs)
        figures["executor_overhead"] = {"sleep_dag": stats, "real_runs": {}}
        cp = stats["critical_path"]
        print(f"Local executor overhead ({len(stats['jobs'])} sleep jobs, unit {args.sleep:g} s, {args.jobs} slots)")
        print(f"  {'run':<34}{'wall s':>9}{'critical path s':>17}{'ratio':>8}")
        print(f"  {'sleep-job DAG':<34}{stats['wall_time_s']:>9.2f}{cp['job_time_s']:>17.2f}"
              f"{cp['wall_over_critical_path']:>8.3f}   (goal <= 1.05)")
        print(f"  critical path: {' -> '.join(cp['jobs'])}")
        for path in args.statistics:
            real = json.loads(path.read_text())
            figures["executor_overhead"]["real_runs"][str(path)] = real
            rcp = real["critical_path"]
            print(f"  {str(path.parent.name)[:34]:<34}{real['wall_time_s']:>9.2f}{rcp['job_time_s']:>17.2f}"
                  f"{rcp['wall_over_critical_path']:>8.3f}")
        print()

    if not args.skip_generator:
        print(f"Generator (workflow.py over placeholder images, sharded: data splits and prediction set in shards "
              f"of {args.per_shard}, predicting on every image; each size in a fresh process)")
        print(f"  {'images':>9}{'per shard':>10}{'jobs':>6}{'replicas':>10}{'build s':>9}{'total s':>9}"
              f"{'peak RSS MB':>13}{'over base':>11}{'workflow.yml KB':>17}{'replicas KB':>13}")
        rows = [(size, args.per_shard) for size in args.sizes]
        # the same number of shards with 10x the images in each: workflow.yml must not grow
        rows.append((args.sizes[0] * 10, args.per_shard * 10))
        figures["generator"] = []
        for size, per_shard in rows:
            row = generator_scaling(size, per_shard)
            figures["generator"].append(row)
            print(f"  {row['images']:>9}{row['per_shard']:>10}{row['jobs']:>6}{row['replicas']:>10}"
                  f"{row['build_s']:>9.2f}{row['total_s']:>9.2f}{row['peak_mb']:>13.0f}"
                  f"{row['peak_mb'] - row['baseline_mb']:>11.0f}{row['workflow_kb']:>17.1f}"
                  f"{row['replicas_kb']:>13.1f}", flush=True)
        print("  goals: 100k images <= 10 s and <= 300 MB peak RSS; 1M <= 60 s; workflow.yml independent of "
              "the images per shard (last row: the first size's shards, 10x the images in each)")
        print()

    if args.fanout_model:
        print(f"Fanned-out prediction, local executor with {args.jobs} slots ({args.fanout_images}, "
              f"{args.fanout_shards} shards, model {args.fanout_model})")
        results = fanout_prediction(args.fanout_model, args.fanout_images, args.fanout_shards, args.jobs)
        figures["fanout_prediction"] = results
        single = results["1 job"]["stats"]["wall_time_s"]
        for layout, result in results.items():
            stats, cp, overall = result["stats"], result["stats"]["critical_path"], result["overall"]
            print(f"  {layout:<8} wall {stats['wall_time_s']:>7.1f} s, critical path {cp['job_time_s']:>7.1f} s "
                  f"(wall / critical path {cp['wall_over_critical_path']:.3f}), "
                  f"{result['images'] / stats['wall_time_s']:.2f} images/s, "
                  f"{single / stats['wall_time_s']:.2f}x the one-job wall time; "
                  f"{overall['faces']} faces, {overall['percent_properly_masked']}% properly masked", flush=True)
        print()

    if args.plan_sizes:
        print("Real Pegasus planner (../shared/pegasus/plan-check.sh: pegasus-plan, condor code generator, condorpool)")
        figures["planner"] = []
        for size in args.plan_sizes:
            result = planning_time(size, args.per_shard)
            if result is None:
                print("  skipped: ../shared/pegasus or java not found")
                break
            figures["planner"].append(result)
            print(f"  {size:>9} images: {result['generated_jobs']} jobs generated, planned in "
                  f"{result['plan_s']:.1f} s (goal at 100k <= 60 s): {result['line']}", flush=True)
    if args.output:
        from utils.atomic import write_json

        figures["load_average"] = os.getloadavg()
        write_json(args.output, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
