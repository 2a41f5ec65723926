"""The web UI (Plotly Dash) served by the API process under ``/ui``, with the platform's users."""

from .app import UIDeps, create_ui

__all__ = ["UIDeps", "create_ui"]
