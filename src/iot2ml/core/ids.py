"""Names that end up in topics, subjects and table names: device ids, device types, fields."""

from __future__ import annotations

import re

from .errors import InvalidInput
from .tables import BASE_COLUMNS, BUILT_IN

_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_TYPE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_FIELD_BAD = re.compile(r"[^a-z0-9_]")

RESERVED_TABLES = frozenset(BUILT_IN)
"""Names of the built-in lake tables: no device type may take one."""
RESERVED_COLUMNS = frozenset(BASE_COLUMNS)
"""Columns every device type's table has: no reading field may take one."""


def check_device_id(device_id: str) -> str:
    """Return ``device_id`` if it can be a topic level and a NATS token, else raise.

    >>> check_device_id("pump-7")
    'pump-7'
    """
    if not isinstance(device_id, str) or not _ID.match(device_id):
        raise InvalidInput(
            f"device_id {device_id!r} is not valid: use 1-128 letters, digits, '-' or '_'"
        )
    return device_id


def check_type_name(name: str) -> str:
    """Return a device type name usable as a table name, else raise.

    >>> check_type_name("pollution")
    'pollution'
    """
    if not isinstance(name, str) or not _TYPE.match(name):
        raise InvalidInput(
            f"device type {name!r} is not valid: use lower-case letters, digits and '_', starting with a letter"
        )
    if name in RESERVED_TABLES:
        raise InvalidInput(f"device type {name!r} is reserved for a built-in table: choose another name")
    return name


def column_name(field: str) -> str:
    """Map a JSON field name to a column name (lower case, ``[a-z0-9_]``).

    >>> column_name("PM2.5")
    'pm2_5'
    """
    col = _FIELD_BAD.sub("_", field.lower())
    if not col or col[0].isdigit():
        col = "f_" + col
    return col
