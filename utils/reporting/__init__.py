"""A finished run read back: its report page (bin/report.py) and the comparison of runs (bin/compare_runs.py).

run_folder.py reads a run folder into one structure both use; html_report.py writes the page;
compare.py builds the table of runs.
"""
