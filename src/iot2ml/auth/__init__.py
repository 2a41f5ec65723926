"""Who may do what: the device and API-key stores in the catalog, and the checks made with them
(device tokens and API keys, cached briefly)."""

from .guard import Guard, Principal
from .store import Devices, Keys

__all__ = ["Devices", "Guard", "Keys", "Principal"]
