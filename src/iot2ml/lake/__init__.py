"""Delta Lake tables (raw, curated per device type, dead letters) on local disk or S3, and their upkeep."""

from .maintenance import Maintainer
from .tables import Lake

__all__ = ["Lake", "Maintainer"]
