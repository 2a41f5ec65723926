"""The lake tables the platform writes, named once in core/tables.py."""

import subprocess
import sys

import pyarrow as pa
import pytest

from iot2ml.core import tables
from iot2ml.core.errors import InvalidInput
from iot2ml.core.ids import RESERVED_COLUMNS, RESERVED_TABLES, check_type_name


def test_built_in_tables_are_reserved_and_every_one_has_its_schema():
    assert RESERVED_TABLES == {"raw", "dead_letters", "labels", "predictions", "prediction_log", "alerts",
                               "model_inputs", "monitor_reports", "audit"} == set(tables.BUILT_IN)
    for name in tables.BUILT_IN:
        assert isinstance(getattr(tables, f"{name.upper()}_SCHEMA"), pa.Schema)
        with pytest.raises(InvalidInput, match=f"device type '{name}' is reserved"):
            check_type_name(name)
    assert [n for n, _ in tables.BASE_FIELDS] == list(tables.BASE_COLUMNS)
    assert RESERVED_COLUMNS == set(tables.BASE_COLUMNS)
    with pytest.raises(AttributeError, match="no attribute 'NOPE_SCHEMA'"):
        tables.NOPE_SCHEMA  # noqa: B018


def test_names_load_without_pyarrow():
    code = "import sys, iot2ml.core.ids, iot2ml.core.tables; print('pyarrow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
