"""``python -m trio_ws``: the launcher (see :mod:`trio_ws.hosting.cli`)."""

import sys

from trio_ws.hosting.cli import main

sys.exit(main())
