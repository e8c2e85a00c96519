"""``python -m models.unknown``: the same as ``valve-model unknown``."""

import sys

from models.unknown.command import main

sys.exit(main())
