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


def test_a_long_or_odd_folder_name_keeps_the_plot_per_folder_readable(tmp_path):
    # A 300-character folder name drew compliance_by_folder.png 3351 px wide, its bars squeezed into the right
    # fifth; a line break in a name split its row in two.
    from PIL import Image

    from utils.detection import plots

    estimate = {"percent": 50.0, "low": 40.0, "high": 60.0, "unit": "image", "units": 5, "faces_found": 3,
                "method": "cc", "confidence": 0.95}
    long_name = "siteA/" + "x" * 300 + "/2026-12-06"
    names = ["site0/cam0", long_name, "two\nlines", "tab\there", "ü ñ/.."]
    plots.plot_compliance_by_folder({name: estimate for name in names}, estimate, tmp_path / "plain.png")
    plain_width = Image.open(tmp_path / "plain.png").width
    plots.plot_compliance_by_folder({"site0/cam0": estimate, "site1/cam0": estimate}, estimate, tmp_path / "short.png")
    assert plain_width < 2 * Image.open(tmp_path / "short.png").width  # the 60-character label against 10
    label = plots.figure_label(long_name)
    assert len(label) == plots.FIGURE_LABEL_CHARS and label.startswith("siteA/x") and label.endswith("x/2026-12-06")
    assert plots.figure_label("two\nlines") == "two?lines" and plots.figure_label("ü ñ 日本/..") == "ü ñ 日本/.."
