"""The workflow generator's layer: its configuration, experiment files, inputs, catalogs and Pegasus adapters.

No job code, and no running of jobs: the local executor that runs a generated workflow is utils/executor/.
"""
