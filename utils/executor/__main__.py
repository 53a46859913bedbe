"""python -m utils.executor RUN_DIR [--jobs N]: run (or resume) a generated workflow on this machine."""

import sys

from .scheduler import main

sys.exit(main())
