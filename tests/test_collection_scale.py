"""What the jobs after the model (merge_predictions, report) cost and show on a large photo collection."""

import os
import subprocess
import sys


def test_the_jobs_that_read_predictions_from_json_do_not_load_torch(root):
    # merge_predictions imported torch and torchvision through predict's module (predictions.csv) and compliance.py
    # (for the evaluation's tensors): ~750 MB and ~4 s a merge of JSON files, before it read a part.
    code = ("import sys, runpy\n"
            "sys.argv = ['job', '--help']\n"
            "for script in ('bin/merge_predictions.py', 'bin/report.py'):\n"
            "    try:\n"
            "        runpy.run_path(script, run_name='__main__')\n"
            "    except SystemExit:\n"
            "        pass\n"
            "import utils.detection.merge, utils.detection.plots, utils.reporting.html_report\n"
            "print('loaded:', sorted(m for m in ('torch', 'torchvision') if m in sys.modules))\n")
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "loaded: []"
