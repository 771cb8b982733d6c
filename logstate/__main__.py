"""``python -m logstate``: the command line (see logstate.cli)."""

import sys

from logstate.cli import main

sys.exit(main())
