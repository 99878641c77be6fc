"""``python -m trio_ws``: the launcher (see :mod:`trio_ws.cli`)."""

import sys

from trio_ws.cli import main

sys.exit(main())
