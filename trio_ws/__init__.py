"""trio_ws: a WebSocket broadcast server on Trio that drains gracefully."""

from trio_ws.settings import Settings, SettingsError

__version__ = "0.1.0"

__all__ = ["Settings", "SettingsError", "__version__"]
