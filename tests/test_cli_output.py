"""Quiet, scriptable output: no library chatter on a user's terminal, whole lines in logs and pipes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa

NOISE = ("INFO", "UserWarning", "warnings.warn", "Successfully registered", "Created version", "mlflow")


def iot2ml(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "iot2ml", *args], capture_output=True, text=True, timeout=180, check=False,
                         env=env or os.environ.copy())
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_train_and_predict_print_only_their_results(settings):
    from iot2ml.lake import Lake

    n = 300
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({
        "device_id": [f"pump-{i % 3}" for i in range(n)],
        "ts": pd.date_range("2026-11-01", periods=n, freq="min", tz="UTC"),
        "pressure": rng.normal(3, 0.2, n), "flow": rng.normal(12, 1, n), "vibration": rng.normal(1, 0.1, n),
    })
    frame["received_at"] = frame["ts"]
    frame["msg_id"] = [f"m{i}" for i in range(n)]
    frame["_seq"] = np.arange(n)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    ts = pa.timestamp("us", tz="UTC")
    for column in ("ts", "received_at"):
        table = table.set_column(table.schema.get_field_index(column), column, table[column].cast(ts))
    Lake(settings.lake).append("pump", table, app_id="test", version=1)

    data = str(settings.data_dir)
    trained = iot2ml("train", "anomaly", "--table", "pump", "--features", "pressure,flow,vibration",
                     "--name", "pump-blockage", "--data-dir", data)
    predicted = iot2ml("predict", "pump-blockage", "--table", "pump", "--data-dir", data)
    for out in (trained, predicted):
        text = out.stdout + out.stderr
        assert [word for word in NOISE if word in text] == [], text
    # A pipe gets whole table rows, not cells cut at 80 columns.
    row = next(line for line in trained.stdout.splitlines() if "pump-blockage" in line)
    assert "challenger,champion" in row and '{"pump": 0}' in row
    assert trained.stderr == "" and predicted.stderr == ""
    assert predicted.stdout.strip() == "300 predictions of pump-blockage v1 written to predictions"

    # The debug log still has what was kept off the terminal.
    debug = iot2ml("predict", "pump-blockage", "--table", "pump", "--data-dir", data,
                   env={**os.environ, "IOT2ML_LOG_LEVEL": "DEBUG"})
    assert "DEBUG py.warnings" in debug.stderr and "UserWarning" in debug.stderr


def test_banner_lines_are_whole_when_stdout_is_a_file(tmp_path):
    """`up`'s banner in a log: the MQTT line keeps "user <id>, password <token>" on one line."""
    script = (
        "from iot2ml.cli.platform import _banner\n"
        "from iot2ml.core.config import load_settings\n"
        "from iot2ml.supervisor import Platform\n"
        "p = Platform(load_settings(data_dir='/tmp/nowhere-with-a-rather-long-name/' + 'x' * 60, mqtt_port=1884))\n"
        "_banner(p.status('up'), 'k' * 43)\n"
    )
    with open(tmp_path / "out.log", "w") as out:
        subprocess.run([sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT, check=True, timeout=60,
                       env={**os.environ, "COLUMNS": "80"})  # as a shell exports it
    lines = (tmp_path / "out.log").read_text().splitlines()
    mqtt = [line for line in lines if "MQTT" in line]
    assert len(mqtt) == 1 and mqtt[0].endswith("user <id>, password <token>)"), lines
    assert any(line.endswith("x" * 60) for line in lines) and any(line.endswith("k" * 43) for line in lines)
