"""The one base class of every "bad input" error in the project.

A job that meets bad input (an unreadable file, a malformed annotation, a model
file of another kind, a flag out of range) raises a subclass of InputError whose
message names the file or flag and the problem in one line. The shared job
runner (utils.cli.run_job) turns it into exit code 2 and that one line, never a
traceback; anything else is a bug and exits 1.
"""


class InputError(ValueError):
    """Bad input or arguments, described in one line that names the file (or flag) and the problem."""
