"""Anomaly task on pump-like series with injected blockages: IsolationForest must beat the rolling z-score."""

from __future__ import annotations

import doctest

import cloudpickle
import numpy as np
import pandas as pd
import pytest

from iot2ml.core.errors import InvalidInput
from iot2ml.ml import anomaly
from iot2ml.ml.anomaly import AnomalyTask, OnlineAnomalyScorer

FEATURES = ["pressure", "flow", "vibration"]


def pump_series(device: str, readings: int, rng: np.random.Generator, *, blockages: bool = True) -> pd.DataFrame:
    """One pump at one reading a minute, its own normal levels, and slow blockages (as in seed 000:
    pressure rises, flow falls, vibration grows over 20-150 minutes, then a flush clears it)."""
    p0, f0, v0 = rng.uniform(3.5, 6.0), rng.uniform(40.0, 90.0), rng.uniform(1.2, 2.8)
    blocked = np.zeros(readings)
    i = int(rng.uniform(50, 300))
    while blockages and i < readings:
        build, clear, peak = int(rng.uniform(20, 150)), int(rng.uniform(3, 15)), rng.uniform(0.35, 1.0)
        x = np.arange(build + clear)
        episode = np.where(x < build, peak * (x / build) ** 1.5, peak * (1 - (x - build) / clear))
        end = min(readings, i + len(episode))
        blocked[i:end] = episode[: end - i]
        i = end + int(rng.uniform(150, 500))
    minute = np.arange(readings)
    demand = 1 + 0.06 * np.sin(2 * np.pi * (minute / 60 - 9) / 24)
    return pd.DataFrame({
        "device_id": device,
        "ts": pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(minute, unit="min"),
        "pressure": p0 * (1 - 0.3 * (demand - 1)) * (1 + 0.45 * blocked) * (1 + rng.normal(0, 0.015, readings)),
        "flow": f0 * demand * (1 - 0.65 * blocked) * (1 + rng.normal(0, 0.02, readings)),
        "vibration": v0 * (1 + 1.8 * blocked**1.2) * np.exp(rng.normal(0, 0.08, readings)),
        "blocked": blocked > 0.05,
    })


@pytest.fixture(scope="module")
def pumps() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    frame = pd.concat([pump_series(f"pump-{d:02d}", 2500, rng) for d in range(10)], ignore_index=True)
    return frame.sample(frac=1.0, random_state=1)  # the task must order by time itself


@pytest.fixture(scope="module")
def labelled(pumps: pd.DataFrame):
    return AnomalyTask(features=FEATURES, label="blocked").fit(pumps)


def test_isolation_forest_beats_rolling_zscore_on_blockage_events(labelled) -> None:
    result = labelled
    assert result.task == "anomaly" and result.primary_metric == "event_f1" and result.greater_is_better
    assert result.beats_baseline()
    assert result.metrics["event_f1"] > 0.85
    assert result.metrics["event_f1"] > result.baseline_metrics["event_f1"] + 0.15
    assert result.metrics["event_precision"] > result.baseline_metrics["event_precision"]
    assert result.metrics["f1"] > result.baseline_metrics["f1"]  # point level too
    assert result.metrics["events"] == result.baseline_metrics["events"] >= 10  # same holdout
    assert result.params["threshold_rule"] == "best_event_f1"


def test_predict_scores_every_reading(pumps: pd.DataFrame, labelled) -> None:
    sample = pumps.head(500)
    out = labelled.model.predict(sample)
    assert list(out.columns) == ["device_id", "ts", "score", "is_anomaly"]
    assert out.index.equals(sample.index)
    assert (out["ts"].to_numpy() == sample["ts"].to_numpy()).all()
    flagged = out["is_anomaly"].to_numpy()
    assert 0 < flagged.sum() and sample["blocked"].to_numpy()[flagged].mean() > 0.8
    assert out.loc[sample["blocked"], "score"].mean() > out.loc[~sample["blocked"], "score"].mean()


def test_without_labels_the_threshold_follows_contamination(pumps: pd.DataFrame) -> None:
    result = AnomalyTask(features=FEATURES, contamination=0.05).fit(pumps.drop(columns="blocked"))
    assert result.primary_metric == "flagged_rate" and not result.greater_is_better
    assert set(result.metrics) == set(result.baseline_metrics) == {"flagged_rate"}
    assert result.model.flagged_rate == pytest.approx(0.05, abs=0.002)
    assert 0.01 < result.metrics["flagged_rate"] < 0.2
    default = AnomalyTask(features=FEATURES).fit(pumps.drop(columns="blocked"))
    assert default.model.flagged_rate == pytest.approx(anomaly.DEFAULT_CONTAMINATION, abs=0.002)


def test_an_unseen_pump_is_judged_against_its_own_normal(labelled) -> None:
    quiet = pump_series("pump-new", 300, np.random.default_rng(5), blockages=False)
    quiet[["pressure", "flow"]] *= [1.4, 0.6]  # a bigger rig: far from every known pump's levels
    assert labelled.model.predict(quiet)["is_anomaly"].mean() < 0.05


def test_bad_input_is_named(pumps: pd.DataFrame, labelled) -> None:
    with pytest.raises(InvalidInput, match="'vibration'"):
        labelled.model.predict(pumps.drop(columns="vibration"))
    with pytest.raises(InvalidInput, match="'temperature'"):
        AnomalyTask(features=[*FEATURES, "temperature"]).fit(pumps)
    with pytest.raises(InvalidInput, match="'maybe'"):
        AnomalyTask(features=FEATURES, label="blocked").fit(pumps.assign(blocked="maybe"))
    with pytest.raises(InvalidInput, match="contamination"):
        AnomalyTask(features=FEATURES, contamination=0.7)


def test_model_round_trips_through_cloudpickle(pumps: pd.DataFrame, labelled) -> None:
    restored = cloudpickle.loads(cloudpickle.dumps(labelled.model))
    pd.testing.assert_frame_equal(restored.predict(pumps.head(300)), labelled.model.predict(pumps.head(300)))


def test_online_scorer_ranks_blockages_above_normal_readings_per_device() -> None:
    rng = np.random.default_rng(3)
    scorer = OnlineAnomalyScorer(FEATURES, window_size=100)
    small, big = pump_series("small", 600, rng, blockages=False), pump_series("big", 600, rng, blockages=False)
    big[["pressure", "flow"]] *= [1.5, 1.8]
    for a, b in zip(small.to_dict("records"), big.to_dict("records"), strict=True):
        scorer.learn_one(a)
        scorer.learn_one(b)
    for series in (small, big):
        normal = series.iloc[-50:].to_dict("records")
        blocked = series.iloc[-50:].assign(pressure=series["pressure"] * 1.3, flow=series["flow"] * 0.6)
        normal_scores = [scorer.score_one(x) for x in normal]
        blocked_scores = [scorer.score_one(x) for x in blocked.to_dict("records")]
        assert np.mean(blocked_scores) > np.mean(normal_scores) + 0.05
    restored = cloudpickle.loads(cloudpickle.dumps(scorer))
    assert restored.score_one(normal[0]) == scorer.score_one(normal[0])
    with pytest.raises(InvalidInput, match="'flow'"):
        scorer.score_one({"device_id": "small", "pressure": 1.0, "vibration": 1.0})


def test_docstring_examples_run() -> None:
    assert doctest.testmod(anomaly).failed == 0
