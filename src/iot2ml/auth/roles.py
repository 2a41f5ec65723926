"""Roles and the permissions each grants: the one table every HTTP route's declared permission is
checked against (``core.http.needs_permission``), for people (users), scripts (API keys) and the CLI.

==================  =============================================================================
viewer              read: SQL and tables, models, deployments, alerts and reports, serving state
data-scientist      viewer + train, labels, schedules (``ml:write``), predictions (``predict``)
operator            data-scientist + deploy/rollback, alert rules and notifiers, devices, serving refresh
admin               operator + users, API keys, the CA, the audit trail
==================  =============================================================================

``reader`` is the role of API keys made before roles existed: viewer plus ``predict`` (what such a
key could do then), so an old key keeps working. Devices have no role: a device token may only send
its own telemetry (``telemetry:write``) and ask for predictions of a model bound to its type
(``predict``; the binding is checked by the serving runtime).
"""

from __future__ import annotations

from ..core.errors import InvalidInput

__all__ = ["DEVICE_PERMISSIONS", "PERMISSIONS", "PUBLIC", "ROLES", "ROLE_PERMISSIONS", "allows", "check_role",
           "roles_with"]

PUBLIC = "public"
"""The declared permission of routes anyone may call (log in, health, metrics)."""

PERMISSIONS: dict[str, str] = {
    "data:read": "SQL queries and the table list",
    "models:read": "registered models and their versions",
    "deployments:read": "deployments and their history",
    "alerts:read": "alert rules, their history, notifiers (secrets masked), monitor reports",
    "serving:read": "what a serving process answers with",
    "ml:write": "train, import labels, retraining schedules",
    "predict": "ask a deployed model for predictions",
    "deployments:write": "deploy, roll back, undeploy",
    "alerts:write": "add, remove, ack and silence alert rules",
    "notifiers:write": "add, remove and test notifiers",
    "devices:read": "registered devices",
    "devices:write": "register and revoke devices",
    "serving:refresh": "make a serving process apply the catalog's deployments now",
    "users:admin": "add, change, disable and remove users",
    "keys:admin": "create and revoke API keys",
    "ca:admin": "the platform's certificate authority",
    "audit:read": "the audit trail",
    "telemetry:write": "send a device's readings (that device's own token only)",
}
"""Every permission a route may declare (besides ``PUBLIC``), with what it lets one do."""

_VIEWER = frozenset({"data:read", "models:read", "deployments:read", "alerts:read", "serving:read"})
_DATA_SCIENTIST = _VIEWER | {"ml:write", "predict"}
_OPERATOR = _DATA_SCIENTIST | {"deployments:write", "alerts:write", "notifiers:write", "devices:read",
                               "devices:write", "serving:refresh"}
_ADMIN = _OPERATOR | {"users:admin", "keys:admin", "ca:admin", "audit:read"}

ROLES = ("viewer", "data-scientist", "operator", "admin")
"""The roles users and API keys take, least to most."""

ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    "viewer": _VIEWER,
    "data-scientist": frozenset(_DATA_SCIENTIST),
    "operator": frozenset(_OPERATOR),
    "admin": frozenset(_ADMIN),
    "reader": _VIEWER | {"predict"},  # API keys made before roles existed
}

DEVICE_PERMISSIONS = frozenset({"telemetry:write", "predict"})
"""What a device token may do (its own telemetry; predictions of a model bound to its type)."""


def allows(role: str, permission: str) -> bool:
    """Whether ``role`` grants ``permission``."""
    return permission == PUBLIC or permission in ROLE_PERMISSIONS.get(role, ())


def roles_with(permission: str) -> list[str]:
    """The roles of ``ROLES`` that grant ``permission``."""
    return [r for r in ROLES if permission in ROLE_PERMISSIONS[r]]


def check_role(role: str, *, legacy: bool = False) -> str:
    """``role`` if known (``legacy`` also accepts ``reader``, the role of keys made before roles);
    ``InvalidInput`` naming the roles otherwise."""
    if role in ROLES or (legacy and role == "reader"):
        return role
    raise InvalidInput(f"role {role!r} is not known: use one of {', '.join(ROLES)}")
