"""Who may do what: roles and their permissions (``roles``), the device, API-key and user stores in
the catalog (``store``, ``users``), the checks made with them (``guard``: device tokens, API keys,
users' access tokens, cached briefly) and the audit trail (``audit``)."""

from .guard import Guard, Principal
from .store import Devices, Keys

__all__ = ["Devices", "Guard", "Keys", "Principal"]
