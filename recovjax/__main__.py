"""``python -m recovjax``: the same as the ``recovjax`` console script."""

import sys

from recovjax.cli import main

sys.exit(main())
