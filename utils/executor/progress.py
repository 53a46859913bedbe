"""What the local executor tells the user: progress while it runs, statistics at the end.

While the workflow runs: one line per job event (start, retry, done, FAILED) and a
status line, rewritten in place on a terminal and printed every so often otherwise.
At the end: statistics.txt / statistics.json in the spirit of pegasus-statistics
(totals, retries, cumulative job time, the critical path) and a one-line summary.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_json, write_text
from .loading import LoadedWorkflow


@dataclass
class JobResult:
    """What happened to one job in this run, over all its tries."""
    job_id: str
    status: str = "pending"   # running | succeeded | failed | skipped | reused | interrupted
    tries: int = 0
    wall_time_s: float = 0.0
    exit_code: int | None = None
    started: float | None = None
    finished: float | None = None
    message: str = ""
    log: str = ""


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def timestamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(seconds))


class Reporter:
    """Prints the progress of one run to *out* and writes its statistics; reads the shared results."""

    def __init__(self, workflow: LoadedWorkflow, results: dict[str, JobResult], out=None):
        self.wf = workflow
        self.results = results  # the executor's, updated as jobs run
        self.out = out or sys.stdout
        self.is_tty = hasattr(self.out, "isatty") and self.out.isatty()
        self.started = time.time()
        self._status_width = 0

    def start_clock(self) -> None:
        self.started = time.time()

    # -- while running -------------------------------------------------------
    def _write(self, text: str) -> None:
        """Progress is for watching: an output that has gone away (`| head`, a closed terminal) ends it, not the
        run, whose record is statistics.txt and the logs."""
        if self.out is None:
            return
        try:
            self.out.write(text)
            self.out.flush()
        except (OSError, ValueError):  # ValueError: written to a closed file
            self.out = None

    def print(self, message: str) -> None:
        self.clear_status()
        self._write(message + "\n")

    def job_event(self, event: str, job_id: str, detail: str = "") -> None:
        """One line per job event, e.g. "[  1m05s] done   train in 58s"."""
        self.print(f"[{format_duration(time.time() - self.started):>6}] {event:<6} {job_id}{detail}")

    def job_finished(self, job_id: str) -> None:
        result = self.results[job_id]
        if result.status == "succeeded":
            extra = f" after {result.tries} tries" if result.tries > 1 else ""
            self.job_event("done", job_id, f" in {format_duration(result.wall_time_s)}{extra}")
        elif result.status == "failed":
            skipped = sorted(j for j, r in self.results.items() if r.status == "skipped"
                             and r.message.endswith(f" {job_id}"))
            self.job_event("FAILED", job_id, f" after {result.tries} tries: {result.message}"
                           + (f"; skipping {', '.join(skipped)}" if skipped else ""))

    def status_line(self, running: Iterable[str]) -> None:
        counts = {}
        for result in self.results.values():
            counts[result.status] = counts.get(result.status, 0) + 1
        finished = counts.get("succeeded", 0) + counts.get("reused", 0)
        now = time.time()
        running = ", ".join(f"{job_id} {format_duration(now - (self.results[job_id].started or now))}"
                            for job_id in sorted(running))
        line = (f"[{format_duration(now - self.started):>6}] {finished}/{len(self.results)} done, "
                f"{counts.get('failed', 0)} failed, {counts.get('skipped', 0)} skipped; running: {running or '-'}")
        if self.is_tty:
            width = shutil.get_terminal_size((120, 20)).columns - 1
            line = line[:width]
            self._write("\r" + line.ljust(self._status_width))
            self._status_width = len(line)
        else:
            self._write(line + "\n")

    def clear_status(self) -> None:
        if self.is_tty and self._status_width:
            self._write("\r" + " " * self._status_width + "\r")
            self._status_width = 0

    # -- at the end ----------------------------------------------------------
    def critical_path(self) -> tuple[list[str], float]:
        """The chain of jobs with the largest summed wall time in this run (reused jobs count 0)."""
        best: dict[str, tuple[float, str | None]] = {}
        for job_id in self.wf.topological_order:
            result = self.results[job_id]
            own = result.wall_time_s if result.status not in ("reused", "skipped", "pending") else 0.0
            parent = max(self.wf.jobs[job_id].parents, key=lambda p: best[p][0], default=None)
            best[job_id] = (own + (best[parent][0] if parent else 0.0), parent)
        if not best:
            return [], 0.0
        end = max(best, key=lambda j: best[j][0])
        total, path, node = best[end][0], [], end
        while node is not None:
            path.append(node)
            node = best[node][1]
        return path[::-1], total

    def statistics(self, finished: float, slots: int) -> dict:
        path, path_time = self.critical_path()
        wall = finished - self.started
        results = list(self.results.values())
        ran = [r for r in results if r.status not in ("reused",)]
        jobs = []
        for job_id in self.wf.topological_order:
            r = self.results[job_id]
            jobs.append({"id": job_id, "transformation": self.wf.jobs[job_id].transformation, "status": r.status,
                         "tries": r.tries, "wall_time_s": round(r.wall_time_s, 3), "exit_code": r.exit_code,
                         "message": r.message, "log": r.log})
        count = lambda status: sum(1 for r in results if r.status == status)  # noqa: E731
        return {
            "workflow": self.wf.name,
            "run_dir": str(self.wf.run_dir),
            "started": timestamp(self.started),
            "wall_time_s": round(wall, 3),
            "slots": slots,
            "totals": {
                "jobs": len(results), "succeeded": count("succeeded"), "failed": count("failed"),
                "skipped": count("skipped"), "reused": count("reused"), "interrupted": count("interrupted"),
                "tries": sum(r.tries for r in ran), "retries": sum(max(0, r.tries - 1) for r in ran),
                "cumulative_job_wall_time_s": round(sum(r.wall_time_s for r in ran), 3),
            },
            "critical_path": {"jobs": path, "job_time_s": round(path_time, 3),
                              "wall_over_critical_path": round(wall / path_time, 4) if path_time > 0 else None},
            "jobs": jobs,
        }

    @staticmethod
    def summary_line(stats: dict) -> str:
        t = stats["totals"]
        parts = [f"{t['succeeded']} succeeded"]
        for key in ("reused", "failed", "skipped", "interrupted"):
            if t[key]:
                parts.append(f"{t[key]} {key}")
        return (f"Workflow {stats['workflow']}: {', '.join(parts)} of {t['jobs']} jobs in "
                f"{format_duration(stats['wall_time_s'])} ({t['retries']} retries)")

    def write_statistics(self, stats: dict) -> Path:
        """statistics.txt (for people) and statistics.json (for scripts) in the run directory."""
        t, cp = stats["totals"], stats["critical_path"]
        # a rerun's wall time (make run run again) is its own alone: a 22-minute run read 0 s unremarked
        rerun = (f": this rerun's alone, {t['reused']} of {t['jobs']} jobs reused from earlier runs, their time not "
                 "in it") if t["reused"] else ""
        lines = [
            f"Workflow statistics: {stats['workflow']}  ({stats['run_dir']})",
            f"Started {stats['started']}, up to {stats['slots']} jobs at once",
            "",
            f"{'Type':<8}{'Succeeded':>10}{'Failed':>8}{'Skipped':>9}{'Interrupted':>13}{'Reused':>8}{'Total':>7}"
            f"{'Tries':>7}{'Retries':>9}",
            f"{'Jobs':<8}{t['succeeded']:>10}{t['failed']:>8}{t['skipped']:>9}{t['interrupted']:>13}"
            f"{t['reused']:>8}{t['jobs']:>7}{t['tries']:>7}{t['retries']:>9}",
            "",
            f"Workflow wall time:        {format_duration(stats['wall_time_s'])} ({stats['wall_time_s']:.1f} s){rerun}",
            f"Cumulative job wall time:  {format_duration(t['cumulative_job_wall_time_s'])} "
            f"({t['cumulative_job_wall_time_s']:.1f} s)",
            f"Critical path job time:    {format_duration(cp['job_time_s'])} ({cp['job_time_s']:.1f} s): "
            + " -> ".join(cp["jobs"]),
        ]
        if cp["wall_over_critical_path"]:
            lines.append(f"Wall time / critical path: {cp['wall_over_critical_path']:.3f}")
        lines += ["", f"{'Job':<26}{'Transformation':<25}{'Status':<12}{'Tries':>6}{'Wall time':>11}{'Exit':>6}  Note"]
        for job in stats["jobs"]:
            exit_code = "-" if job["exit_code"] is None else str(job["exit_code"])
            lines.append(f"{job['id']:<26}{job['transformation']:<25}{job['status']:<12}{job['tries']:>6}"
                         f"{job['wall_time_s']:>10.1f}s{exit_code:>6}  {job['message']}")
        write_text(self.wf.run_dir / "statistics.txt", "\n".join(lines) + "\n")
        write_json(self.wf.run_dir / "statistics.json", stats)
        return self.wf.run_dir / "statistics.txt"
