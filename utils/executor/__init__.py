"""The local executor: runs a generated Pegasus workflow (RUN_DIR/workflow.yml and its catalogs) on this
machine, the way Pegasus and DAGMan would, without HTCondor.

    python -m utils.executor RUN_DIR [--jobs N]

scheduler.py schedules; loading.py reads the run directory, job_try.py runs one try of a job,
resume_state.py keeps executor_state.json, progress.py prints progress lines and writes the statistics.
It only reads what the generator (workflow.py, utils/pegasus/) wrote: nothing here builds a workflow.
"""

from .loading import WorkflowError, load_workflow, read_properties
from .scheduler import main, run_lock, run_workflow, unpack_tensorboard

__all__ = ["WorkflowError", "load_workflow", "main", "read_properties", "run_lock", "run_workflow",
           "unpack_tensorboard"]
