"""Monitoring: where alerts go, and (coming) what raises them.

- ``notifiers.py``: the kinds of notifier (Alertmanager webhook, Slack, e-mail, Apprise) sharing
  ``send(notification) -> Delivery``, and ``make_notifier``;
- ``dispatch.py``: background delivery with retries and backoff, every attempt logged;
- ``store.py``: the notifiers and the delivery log, in the catalog;
- ``checks.py``: the contract every notifier passes; ``http.py``: ``/api/v1/notifiers``, ``/api/v1/alerts``;
- ``service.py``: the ``monitor`` component's loop (rules -> ``alerts`` table -> notifications).

Drift and data-quality profiles (``drift.py``, ``profile.py``) and alert rules (``rules.py``) join
them. Importing this package loads no driver: httpx, smtplib and apprise load when a notifier is
made or sends.
"""

from __future__ import annotations

from .dispatch import Dispatcher, deliver
from .notifiers import (
    KINDS,
    Alert,
    AppriseNotifier,
    Delivery,
    EmailNotifier,
    Notification,
    Notifier,
    SlackNotifier,
    WebhookNotifier,
    make_notifier,
)
from .store import Notifiers

__all__ = [
    "KINDS", "Alert", "AppriseNotifier", "Delivery", "Dispatcher", "EmailNotifier", "Notification", "Notifier",
    "Notifiers", "SlackNotifier", "WebhookNotifier", "deliver", "make_notifier",
]
