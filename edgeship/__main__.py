"""``python -m edgeship`` is the ``edgeship`` command."""

import sys

from edgeship.cli import main

sys.exit(main())
