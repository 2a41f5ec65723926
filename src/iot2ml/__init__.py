"""iot2ml: devices -> broker -> Delta lake -> SQL -> models, on one laptop or a cluster."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Client", "Settings", "__version__"]


def __getattr__(name: str):  # lazy: importing iot2ml must stay cheap
    if name == "Client":
        from .client import Client

        return Client
    if name == "Settings":
        from .core.config import Settings

        return Settings
    raise AttributeError(name)
