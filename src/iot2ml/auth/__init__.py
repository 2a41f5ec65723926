"""Who may do what: device tokens and API keys checked against the catalog (cached briefly)."""

from .guard import Guard, Principal

__all__ = ["Guard", "Principal"]
