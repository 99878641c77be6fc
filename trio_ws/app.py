"""The ASGI entry point: ``hypercorn --worker-class trio trio_ws.app:app``.

Settings come from the ``TRIO_WS_*`` environment variables; ``create_app`` builds more apps
(tests, custom runners).
"""

from __future__ import annotations

from trio_ws.hosting import hypercorn_cli
from trio_ws.hosting.compose import build_app as create_app
from trio_ws.settings import SettingsError

__all__ = ["app", "create_app"]

try:
    app = create_app()
except SettingsError as error:
    # A clear one-line error and a non-zero exit, instead of a traceback from Hypercorn's loader.
    raise SystemExit(f"trio_ws: invalid configuration: {error}") from None
hypercorn_cli.prepare_process()
