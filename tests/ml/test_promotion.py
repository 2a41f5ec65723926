"""Promotion on the same holdout, end to end on real Delta tables, real models and a real MLflow store.

For every task: a retraining on the same data keeps the champion (nothing newer to compare on); on
newer data a worse recipe stays challenger and a better one becomes champion, both scored on the
units newer than the champion's training data, and both scores are tags of the run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from iot2ml.ml.jobs import TrainJob
from iot2ml.ml.workbench import Workbench

TS = pa.timestamp("us", tz="UTC")


def write(lake: Any, table: str, frame: pd.DataFrame, version: int) -> None:
    frame = frame.copy()
    frame["received_at"] = frame["ts"]
    frame["_seq"] = np.arange(len(frame)) + version * 1_000_000
    t = pa.Table.from_pandas(frame, preserve_index=False)
    for col in ("ts", "received_at"):
        t = t.set_column(t.schema.get_field_index(col), col, t[col].cast(TS))
    lake.append(table, t, app_id="test", version=version)


def decision(bench: Workbench, described: dict[str, Any]) -> dict[str, str]:
    """The promotion tags of the version's run."""
    tags = bench.registry.client.get_run(described["run_id"]).data.tags
    return {k.removeprefix("iot2ml.promotion."): v for k, v in tags.items() if k.startswith("iot2ml.promotion.")}


def assert_kept_for_lack_of_newer_data(described: dict[str, Any], since: str) -> None:
    assert described["aliases"] == ["challenger"]
    assert described["compared_by"] == "not compared"
    assert f"no data newer than the champion's ({since})" in described["promotion"]
    assert f"champion v1 kept; deploy version {described['version']} explicitly" in described["promotion"]


def assert_compared(bench: Workbench, described: dict[str, Any], *, since: str, units: int,
                    promoted: bool) -> dict[str, str]:
    tags = decision(bench, described)
    assert described["compared_by"] == f"same holdout: {units} units newer than champion's data ({since})"
    assert tags["holdout_units"] == str(units) and since in tags["holdout"]
    new, champion = float(tags["new_score"]), float(tags["champion_score"])
    better = new > champion if tags["metric"] in {"macro_f1", "event_f1"} else new < champion
    assert better is promoted
    if promoted:
        assert "champion" in described["aliases"] and tags["champion"] == str(described["version"])
        assert f"beats champion v1 {tags['metric']}=" in described["promotion"]
    else:
        assert described["aliases"] == ["challenger"] and tags["champion"] == "1"
        assert f"does not beat champion v1 {tags['metric']}=" in described["promotion"]
    return tags


@pytest.fixture
def bench(settings):
    return Workbench(settings)


def wine(n: int, start: str, seed: int) -> pd.DataFrame:
    """One reading per batch, a minute apart from ``start``; quality and score follow alcohol and acidity."""
    rng = np.random.default_rng(seed)
    alcohol, acidity = rng.normal(10.5, 1.2, n), rng.normal(0.5, 0.15, n)
    score = alcohol - 4 * acidity + rng.normal(0, 0.3, n)
    return pd.DataFrame({
        "device_id": "station-1", "ts": pd.date_range(start, periods=n, freq="min", tz="UTC"),
        "batch_id": [f"b{seed}-{i}" for i in range(n)], "alcohol": alcohol, "volatile_acidity": acidity,
        "ph": rng.normal(3.3, 0.1, n), "score": score,
        "quality": np.where(score > 10.2, "best", np.where(score > 8.6, "better", "good")),
    })


ALL = ["alcohol", "volatile_acidity", "ph"]


@pytest.mark.parametrize("task", ["classify", "regress"])
def test_tabular_champion_changes_only_for_a_better_score_on_newer_units(bench, task):
    options = ({"label": "quality", "entity": "batch_id"} if task == "classify"  # one row per batch
               else {"label": "score"})  # one row per reading

    def job(features: list[str]) -> TrainJob:
        return TrainJob(task=task, table="wine", name=f"w-{task}", options={**options, "folds": 3, "features": features})

    write(bench.lake, "wine", wine(120, "2026-11-01", seed=1), 1)
    first = bench.train(job(["alcohol", "ph"]))
    assert "champion" in first["aliases"] and first["trained_until"] == "2026-11-01T01:59:00+00:00"
    since = "2026-11-01T01:59:00Z"
    assert_kept_for_lack_of_newer_data(bench.train(job(ALL)), since)  # better recipe, but no newer data

    write(bench.lake, "wine", wine(80, "2026-11-02", seed=2), 2)
    assert_compared(bench, bench.train(job(["ph"])), since=since, units=80, promoted=False)  # noise only
    tags = assert_compared(bench, bench.train(job(ALL)), since=since, units=80, promoted=True)
    unit = "labelled entities whose first reading is" if task == "classify" else "labelled readings"
    assert tags["holdout"] == f"80 {unit} after {since}"
    assert tags["metric"] == ("macro_f1" if task == "classify" else "mae")


def ozone(days: int, *, seed: int, series: int = 3) -> pd.DataFrame:
    """Hourly ozone with a daily cycle and a trend, which seasonal naive misses and LightGBM learns."""
    rng = np.random.default_rng(seed)
    hours = pd.date_range("2026-11-01", periods=24 * days, freq="h", tz="UTC")
    t = np.arange(len(hours))
    return pd.concat([pd.DataFrame({"device_id": f"station-{d}", "ts": hours, "ozone": 40 + 15 * np.sin(
        2 * np.pi * (t % 24) / 24) + 0.1 * t + rng.normal(0, 1, len(t))}) for d in range(series)], ignore_index=True)


def test_forecast_champion_changes_only_for_a_better_last_fold(bench):
    full = ozone(10, seed=5)
    cut = pd.Timestamp("2026-11-08", tz="UTC")
    base = {"target": "ozone", "freq": "1h", "horizon": 24, "n_jobs": 1}

    def job(**options: Any) -> TrainJob:
        return TrainJob(task="forecast", table="ozone", name="oz", options={**base, **options})

    write(bench.lake, "ozone", full[full["ts"] < cut], 1)
    first = bench.train(job(candidates="seasonal_naive"))
    since = "2026-11-07T23:00:00Z"
    assert "champion" in first["aliases"] and first["trained_until"] == "2026-11-07T23:00:00+00:00"
    assert_kept_for_lack_of_newer_data(bench.train(job(candidates="seasonal_naive,lightgbm")), since)

    write(bench.lake, "ozone", full[full["ts"] >= cut], 2)
    assert_compared(bench, bench.train(job(candidates="seasonal_naive", season_length=7)),  # wrong season
                    since=since, units=3, promoted=False)
    tags = assert_compared(bench, bench.train(job(candidates="seasonal_naive,lightgbm")), since=since, units=3,
                           promoted=True)
    assert tags["metric"] == "mase"
    assert tags["holdout"] == f"last backtest fold (24 steps) of 3 series, starting after {since}"


def pumps(n: int, start: str, seed: int) -> pd.DataFrame:
    """Three pumps, a reading a minute; blockages raise pressure and cut flow for 12 minutes."""
    rng = np.random.default_rng(seed)
    frames = []
    for d in range(3):
        blocked = np.zeros(n, dtype=bool)
        for s in rng.choice(np.arange(20, n - 30), 3, replace=False):
            blocked[s:s + 12] = True
        frames.append(pd.DataFrame({
            "device_id": f"p{d}", "ts": pd.date_range(start, periods=n, freq="min", tz="UTC"),
            "pressure": 3 + rng.normal(0, 0.1, n) + blocked * 1.5, "flow": 12 + rng.normal(0, 0.3, n) - blocked * 5,
            "blocked": blocked.astype(int),
        }))
    return pd.concat(frames, ignore_index=True)


def test_anomaly_champion_changes_only_for_a_better_event_f1_on_newer_readings(bench):
    def job(**options: Any) -> TrainJob:
        return TrainJob(task="anomaly", table="pump", name="pb",
                        options={"features": ["pressure", "flow"], "label": "blocked", **options})

    write(bench.lake, "pump", pumps(300, "2026-11-01", seed=1), 1)
    first = bench.train(job(contamination=0.2))  # flags a fifth of the readings: many false alarms
    since = "2026-11-01T04:59:00Z"
    assert "champion" in first["aliases"] and first["trained_until"] == "2026-11-01T04:59:00+00:00"
    assert_kept_for_lack_of_newer_data(bench.train(job()), since)

    write(bench.lake, "pump", pumps(300, "2026-11-01 05:00", seed=2), 2)
    # the holdout is each pump's newest 30 % (180 of 600 readings), all after the champion's data
    assert_compared(bench, bench.train(job(contamination=0.45)), since=since, units=540, promoted=False)
    tags = assert_compared(bench, bench.train(job()), since=since, units=540, promoted=True)  # threshold tuned on labels
    assert tags["metric"] == "event_f1"
