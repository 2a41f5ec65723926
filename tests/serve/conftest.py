"""Fixtures of the serving tests (defined in servekit.py, which the tests also import helpers from)."""

from servekit import served, trained  # noqa: F401 - fixtures
